"""DTLS through a UDP path that loses, duplicates, reorders, delays and replays datagrams.

Between the client and s6-dtlsserver, ``udp_faultproxy.UdpFaultProxy`` (an
asyncio relay on loopback) misbehaves as each test says.  The handshake
must complete through retransmission, on the schedule of the timers; each
application datagram must arrive at most once; a record replayed by an
attacker must be dropped.  Each test prints the proxy's counts (``-s``).
"""

import os
import select
import subprocess
import sys

import pytest
from conftest import program
from dtls_peer import APPS, ECHO, DtlsClient, lines_until, stop
from udp_faultproxy import Fault, UdpFaultProxy

COUNT = [sys.executable, os.path.join(APPS, "dgram_count.py")]


def logged(path) -> list[bytes]:
    """The datagrams ``dgram_echo.py`` logged, in order."""
    return [line.split(b" ", 1)[1] for line in path.read_bytes().splitlines()]


def test_both_programs_complete_the_handshake_through_every_fault_and_deliver_once(
    dtls_server, client_env, tmp_path
):
    log = tmp_path / "log"
    proc, port = dtls_server(["-K", "30000"], [*ECHO, str(log)])
    # Lost: the ClientHello with its cookie and the client's last flight; the
    # server's first flight and its Finished.  Each is sent again on a timer.
    c2s = Fault(drop=frozenset({1, 2}), duplicate=0.5, reorder=0.3, delay=(0, 0.01))
    s2c = Fault(drop=frozenset({1, 3}), duplicate=0.5, reorder=0.3, delay=(0, 0.01))
    with UdpFaultProxy(port, c2s, s2c, seed=16) as proxy:
        res = subprocess.run(
            [*program("s6-dtlsclient"), "-K", "30000", "localhost", str(proxy.port), *COUNT, "50"],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (res.returncode, res.stdout) == (0, "got 50 of 50, 0 duplicates\n"), res.stderr
        lines_until(proc, "status 0")  # the client's close_notify, which the proxy may hold
        print(f"\nfault proxy, both programs: {proxy.report()}")
        counts = proxy.counts
    assert counts["c2s"]["dropped"] == 2 and counts["s2c"]["dropped"] == 2
    assert counts["c2s"]["duplicated"] and counts["s2c"]["duplicated"]
    assert counts["c2s"]["reordered"] and counts["s2c"]["reordered"]
    assert sorted(logged(log), key=int) == [b"%d" % i for i in range(50)]  # each once


def test_a_replayed_record_is_dropped(dtls_server, pki, tmp_path):
    log = tmp_path / "log"
    proc, port = dtls_server([], [*ECHO, str(log)])
    with UdpFaultProxy(port) as proxy:
        client = DtlsClient(proxy.port, pki["ca"])
        client.handshake()
        client.send(b"pay 100")
        assert client.recv() == b"pay 100"
        record = proxy.counts["c2s"]["passed"] - 1  # the record that carried it
        for _ in range(3):
            proxy.replay("c2s", record)
        client.send(b"after the replays")
        assert client.recv() == b"after the replays"  # and not "pay 100" again
        client.close_notify()
        lines_until(proc, "status 0")
        print(f"\nfault proxy, replay: {proxy.report()}")
        assert proxy.counts["c2s"]["replayed"] == 3
    assert logged(log) == [b"pay 100", b"after the replays"]
    client.close()
    assert stop(proc)[0] == 0


@pytest.mark.parametrize(("minimum", "gap"), [(None, (0.9, 2.9)), ("3000", (2.9, 30))])
def test_the_client_retransmits_after_dtls_handshake_timeout_min(
    minimum, gap, dtls_server, client_env
):
    _proc, port = dtls_server([], ["cat"])
    env = {**client_env, **({"DTLS_HANDSHAKE_TIMEOUT_MIN": minimum} if minimum else {})}
    with UdpFaultProxy(port, Fault(drop=frozenset({0}))) as proxy:
        res = subprocess.run(
            [*program("s6-dtlsclient"), "localhost", str(proxy.port), "true"],
            env=env,
            capture_output=True,
            timeout=60,
        )
        first, second = proxy.seen_at["c2s"][:2]
    assert res.returncode == 0, res.stderr
    assert gap[0] <= second - first < gap[1]


@pytest.mark.parametrize(("minimum", "gap"), [(None, (0.9, 2.9)), ("3000", (2.9, 30))])
def test_the_server_retransmits_after_dtls_handshake_timeout_min(
    minimum, gap, dtls_server, server_env, pki
):
    env = {**server_env, **({"DTLS_HANDSHAKE_TIMEOUT_MIN": minimum} if minimum else {})}
    _proc, port = dtls_server([], ["cat"], env)
    with UdpFaultProxy(port, s2c=Fault(drop=frozenset({1}))) as proxy:
        client = DtlsClient(proxy.port, pki["ca"])
        client.step()  # the ClientHello
        select.select([client.sock], [], [], 30)
        client.step()  # the HelloVerifyRequest; the ClientHello with its cookie
        proxy.wait_seen("s2c", 3)  # the server's flight (dropped), then again: its own timer
        first, second = proxy.seen_at["s2c"][1:3]
        client.close()
    assert gap[0] <= second - first < gap[1]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_random_loss_duplication_reordering_and_delay(seed, dtls_server, client_env, tmp_path):
    """S6TLS_SLOW=1: a fifth of the datagrams lost, duplicated, reordered, delayed, both ways."""
    log = tmp_path / "log"
    _proc, port = dtls_server(["-K", "60000"], [*ECHO, str(log)])
    fault = Fault(loss=0.2, duplicate=0.2, reorder=0.2, delay=(0, 0.05))
    with UdpFaultProxy(port, fault, fault, seed=seed) as proxy:
        res = subprocess.run(
            [*program("s6-dtlsclient"), "-K", "60000", "--idle-timeout", "3", "localhost",
             str(proxy.port), *COUNT, "30"],
            env=client_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        print(f"\nfault proxy, seed {seed}: {proxy.report()}; {res.stdout.strip()}")
    assert res.returncode in (0, 1) and res.stdout.endswith(" 0 duplicates\n"), res.stderr
    got = logged(log)
    assert len(got) == len(set(got))  # at most once, whatever was lost

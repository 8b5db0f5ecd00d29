"""The stateless cookie exchange: what the listener answers, and what it remembers (nothing)."""

from dtls_peer import client_hello, memory_client, next_flight
from OpenSSL import SSL

from s6tls.dtls.cookie import GENERATION, Cookies, verify_hello
from s6tls.tls.config import Options, TlsConfig
from s6tls.tls.context import Contexts

PEER = ("192.0.2.7", 40000)


def server_context(pki) -> SSL.Context:
    env = {"CERTFILE": pki["server_cert"], "KEYFILE": pki["server_key"]}
    cfg = TlsConfig.from_env("server", env, Options(), dtls=True)
    return Contexts(cfg).context


def test_a_cookie_is_good_for_its_address_in_this_generation_and_the_last():
    now = [1000.0 * GENERATION]
    cookies = Cookies(clock=lambda: now[0])
    cookie = cookies.make(PEER)
    assert cookies.check(PEER, cookie)
    assert not cookies.check(("192.0.2.7", 40001), cookie)  # another port
    assert not cookies.check(("192.0.2.8", 40000), cookie)  # another address
    assert not Cookies(clock=lambda: now[0]).check(PEER, cookie)  # another secret
    now[0] += GENERATION
    assert cookies.check(PEER, cookie)
    now[0] += GENERATION
    assert not cookies.check(PEER, cookie)  # two generations later: stale


def test_a_client_hello_without_cookie_gets_a_smaller_hello_verify_request(pki):
    ctx = server_context(pki)
    hello = client_hello()
    reply, verified = verify_hello(ctx, hello, PEER)
    assert not verified
    assert reply[0] == 22 and reply[13] == 3  # handshake record: HelloVerifyRequest
    assert len(reply) < len(hello)  # no amplification
    again, _ = verify_hello(ctx, hello, PEER)
    assert again == reply  # no state: the same question, the same answer


def test_the_client_hello_that_returns_its_cookie_is_verified_from_its_address_only(pki):
    ctx = server_context(pki)
    client = memory_client()
    reply, _ = verify_hello(ctx, next_flight(client), PEER)
    with_cookie = next_flight(client, reply)
    assert verify_hello(ctx, with_cookie, PEER) == (b"", True)
    assert verify_hello(ctx, with_cookie, ("192.0.2.99", 40000))[1] is False


def test_garbage_gets_no_answer(pki):
    assert verify_hello(server_context(pki), b"\x16\xfe\xfd garbage" * 10, PEER) == (b"", False)

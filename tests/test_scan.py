"""sslyze against s6-tlsserver: protocol versions, renegotiation, known attacks,
certificate, and the verdicts of Mozilla's TLS profiles.

The scanner lives in its own venv (``.venv-scan``, made by ``scripts/install
--test``) because it pins an older cryptography.  The server's certificate
comes from ``s6tls.pki.make_pki`` (strict RFC 5280; trustme's critical
subjectAltName makes sslyze reject the chain).  The first scan names every
scan explicitly, with the profile check off; the profile scans run side by
side: "intermediate" with an ECDSA and with an RSA certificate (the RSA one
is what a default with static-RSA and CBC suites fails), "modern" with
TLS_MIN_VERSION=1.3, and the same "modern" scan of the default policy, which
must fail.
"""

import json
import os
import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT
from server_helpers import serving, start_server, tls_connect

from s6tls.tls.pki import make_pki

SCANNER = ROOT / ".venv-scan" / "bin" / "python"
SCANS = [
    "--certinfo",
    "--sslv2",
    "--sslv3",
    "--tlsv1",
    "--tlsv1_1",
    "--tlsv1_2",
    "--tlsv1_3",
    "--reneg",
    "--compression",
    "--heartbleed",
    "--robot",
    "--openssl_ccs",
    "--fallback",
]


def scanner_available() -> bool:
    if not SCANNER.exists():
        return False
    probe = subprocess.run([str(SCANNER), "-c", "import sslyze"], capture_output=True, timeout=60)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not scanner_available(),
    reason="sslyze is not installed in .venv-scan (run ./scripts/install --test)",
)


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """Scan one s6-tlsserver; return the scan's JSON results and the server's stderr."""
    d = tmp_path_factory.mktemp("scan")
    files = make_pki(d, ["localhost", "127.0.0.1"])
    env = {**os.environ, "CERTFILE": files["cert"], "KEYFILE": files["key"]}
    server, port = start_server([], ["cat"], env)
    log: list[bytes] = []
    reader = threading.Thread(target=lambda: log.extend(server.stderr), daemon=True)
    reader.start()
    try:
        out = d / "scan.json"
        result = subprocess.run(
            [
                str(SCANNER),
                "-m",
                "sslyze",
                "--quiet",
                f"--json_out={out}",
                "--mozilla_config=disable",
                f"--certinfo_ca_file={files['ca']}",
                "--sni=localhost",
                *SCANS,
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr.decode()[-3000:]
        # The server is still serving after a few hundred hostile handshakes.
        conn = tls_connect(port, files["ca"])
        conn.sendall(b"still here")
        assert conn.recv(100) == b"still here"
        conn.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
        reader.join(30)
    report = json.loads(out.read_text())
    (server_result,) = report["server_scan_results"]
    assert server_result["scan_status"] == "COMPLETED", server_result
    results = server_result["scan_result"]
    return results, b"".join(log).decode(errors="replace")


def result(scan, name: str) -> dict:
    results, _log = scan
    entry = results[name]
    assert entry["status"] == "COMPLETED", entry
    return entry["result"]


@pytest.mark.parametrize(
    "name", ["ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites",
             "tls_1_1_cipher_suites"]
)  # fmt: skip
def test_ssl2_ssl3_tls10_and_tls11_are_refused(scan, name):
    found = result(scan, name)
    assert found["accepted_cipher_suites"] == []
    assert found["is_tls_version_supported"] is False
    assert found["rejected_cipher_suites"]  # they were tried


def test_tls12_and_tls13_are_offered_with_forward_secrecy_only(scan):
    tls13 = result(scan, "tls_1_3_cipher_suites")
    tls12 = result(scan, "tls_1_2_cipher_suites")
    assert tls13["is_tls_version_supported"] and tls12["is_tls_version_supported"]
    names = [c["cipher_suite"]["name"] for c in tls12["accepted_cipher_suites"]]
    assert names and all(n.startswith("TLS_ECDHE_") for n in names), names


def test_no_insecure_or_client_initiated_renegotiation(scan):
    found = result(scan, "session_renegotiation")
    assert found["supports_secure_renegotiation"] is True
    assert found["is_vulnerable_to_client_renegotiation_dos"] is False
    assert found["client_renegotiations_success_count"] == 0


def test_no_compression(scan):
    assert result(scan, "tls_compression")["supports_compression"] is False


def test_not_vulnerable_to_heartbleed_robot_or_ccs_injection(scan):
    assert result(scan, "heartbleed")["is_vulnerable_to_heartbleed"] is False
    assert result(scan, "openssl_ccs_injection")["is_vulnerable_to_ccs_injection"] is False
    assert result(scan, "robot")["robot_result"].startswith("NOT_VULNERABLE")


def test_downgrade_protection_with_fallback_scsv(scan):
    assert result(scan, "tls_fallback_scsv")["supports_fallback_scsv"] is True


def test_the_certificate_validates_against_the_test_ca_and_nothing_else(scan):
    found = result(scan, "certificate_info")
    assert found["hostname_used_for_server_name_indication"] == "localhost"
    (deployment,) = found["certificate_deployments"]
    verdicts = {
        v["trust_store"]["name"]: v["was_validation_successful"]
        for v in deployment["path_validation_results"]
    }
    assert verdicts.pop("Supplied CA file") is True
    assert verdicts and not any(verdicts.values()), verdicts  # no public store trusts it
    assert deployment["received_chain_has_valid_order"] is True
    assert deployment["verified_chain_has_sha1_signature"] is False


def test_the_server_reported_each_refused_handshake_on_one_line(scan):
    _results, log = scan
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if line]
    assert lines, "a scan makes the server refuse many handshakes"
    pattern = re.compile(r"^s6-tlsserver: warning: peer \S+ pid \d+: \S.*$")
    assert all(pattern.match(line) for line in lines), [
        line for line in lines if not pattern.match(line)
    ][:5]


# --- Mozilla's profiles -------------------------------------------------------------------

PROFILES = {
    # name: (sslyze profile, leaf key type, extra server environment)
    "intermediate-ecdsa": ("intermediate", "ecdsa", {}),
    "intermediate-rsa": ("intermediate", "rsa", {}),
    "modern-tls13": ("modern", "ecdsa", {"TLS_MIN_VERSION": "1.3"}),
    "modern-default": ("modern", "ecdsa", {}),
}


def profile_scan(directory, profile: str, key_type: str, extra: dict[str, str]) -> str:
    """sslyze --mozilla_config=PROFILE against an s6-tlsserver; its compliance lines."""
    directory.mkdir()
    files = make_pki(directory, ["localhost", "127.0.0.1"], key_type)
    env = {**os.environ, "CERTFILE": files["cert"], "KEYFILE": files["key"], **extra}
    with serving([], ["cat"], env) as (_server, port):
        result = subprocess.run(
            [str(SCANNER), "-m", "sslyze", f"--mozilla_config={profile}",
             f"--certinfo_ca_file={files['ca']}", "--sni=localhost", f"127.0.0.1:{port}"],
            capture_output=True, timeout=600,
        )  # fmt: skip
    text = result.stdout.decode()
    verdict = text.split("COMPLIANCE AGAINST TLS CONFIGURATION", 1)[-1]
    return f"exit {result.returncode}\n{verdict.strip()}"


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("profiles")
    with ThreadPoolExecutor(len(PROFILES)) as pool:
        futures = {
            name: pool.submit(profile_scan, base / name, *args) for name, args in PROFILES.items()
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", ["intermediate-ecdsa", "intermediate-rsa", "modern-tls13"])
def test_the_default_policy_meets_mozillas_profiles(verdicts, name):
    assert verdicts[name].startswith("exit 0\n"), verdicts[name]
    assert "OK - Compliant." in verdicts[name], verdicts[name]


def test_modern_needs_tls_min_version_1_3(verdicts):
    verdict = verdicts["modern-default"]
    assert "FAILED - Not compliant." in verdict, verdict
    assert "TLS versions {'TLSv1.2'} are supported" in verdict

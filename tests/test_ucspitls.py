"""The UCSPI-TLS control protocol, with no I/O: the command byte and the notification block."""

import pytest

from s6tls.errors import ExitCode, UsageError
from s6tls.starttls.control import Command, encode_notification, parse_command


@pytest.mark.parametrize(
    ("data", "command"),
    [(b"", Command.DECLINE), (b"Y", Command.NOTIFY), (b"y", Command.QUIET)],
)
def test_the_command_bytes(data, command):
    assert parse_command(data) is command


@pytest.mark.parametrize("data", [b"N", b"\0", b"\n", b"\xff", b"S"])
def test_any_other_command_byte_is_a_usage_error(data):
    with pytest.raises(UsageError, match=r"^unrecognized command on control socket$") as info:
        parse_command(data)
    assert info.value.exit_code == ExitCode.USAGE


def test_the_notification_block_has_six_entries_in_order_and_a_final_nul():
    facts = {
        "SSL_PEER_CERT_SUBJECT": "/CN=client.example",
        "SSL_CIPHER": "TLS_AES_256_GCM_SHA384",
        "SSL_PROTOCOL": "TLSv1.3",
        "SSL_PEER_CERT_HASH": "SHA256:00ff",
        "SSL_TLS_SNI_SERVERNAME": "mail.example",
        "SSL_ALPN_PROTOCOL": "imap",
        "UNRELATED": "never sent",
    }
    assert encode_notification(facts) == (
        b"SSL_PROTOCOL=TLSv1.3\0"
        b"SSL_CIPHER=TLS_AES_256_GCM_SHA384\0"
        b"SSL_TLS_SNI_SERVERNAME=mail.example\0"
        b"SSL_PEER_CERT_HASH=SHA256:00ff\0"
        b"SSL_PEER_CERT_SUBJECT=/CN=client.example\0"
        b"SSL_ALPN_PROTOCOL=imap\0"
        b"\0"
    )


def test_unset_facts_are_keys_without_equals():
    block = encode_notification(
        {"SSL_PROTOCOL": "TLSv1.2", "SSL_CIPHER": "X", "SSL_PEER_CERT_HASH": ""}
    )
    assert block == (
        b"SSL_PROTOCOL=TLSv1.2\0SSL_CIPHER=X\0"
        b"SSL_TLS_SNI_SERVERNAME\0SSL_PEER_CERT_HASH\0SSL_PEER_CERT_SUBJECT\0"
        b"SSL_ALPN_PROTOCOL\0\0"
    )


def test_a_value_with_a_nul_cannot_be_sent():
    with pytest.raises(ValueError, match=r"SSL_PEER_CERT_SUBJECT"):
        encode_notification({"SSL_PROTOCOL": "TLSv1.3", "SSL_PEER_CERT_SUBJECT": "/CN=a\0b"})

"""Certificates, CRLs and OCSP responses for the policy tests.

``TestCA`` issues leaves with whatever subject, subjectAltNames and dates a
test needs (made with cryptography, which trustme cannot do for URIs or
hostile subjects), and runs the real ``openssl ca`` and ``openssl ocsp``
over its own database to revoke, make CRLs and answer OCSP requests.
Everything is written under one directory, keys with mode 0600.
"""

import base64
import datetime
import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)

CA_CONF = """\
[ca]
default_ca = s6tls_test
[s6tls_test]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir
certificate = $dir/ca.pem
private_key = $dir/ca.key
serial = $dir/serial
crlnumber = $dir/crlnumber
default_md = sha256
default_crl_days = 1
policy = anything
[anything]
commonName = optional
"""


@dataclass
class Leaf:
    """A certificate and its key, and where they were written."""

    cert: x509.Certificate
    key: object
    cert_path: str
    key_path: str


def _san(value: str) -> x509.GeneralName:
    """``DNS:``, ``URI:``, ``email:`` or ``IP:`` + value, as openssl writes them."""
    kind, _, text = value.partition(":")
    return {
        "DNS": lambda: x509.DNSName(text),
        "URI": lambda: x509.UniformResourceIdentifier(text),
        "email": lambda: x509.RFC822Name(text),
        "IP": lambda: x509.IPAddress(ipaddress.ip_address(text)),
    }[kind]()


def _der(tag: int, content: bytes) -> bytes:
    """One DER TLV."""
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _oid_der(oid: x509.ObjectIdentifier) -> bytes:
    """The DER of an OID whose arcs after the first two are below 128."""
    first, second, *rest = (int(arc) for arc in oid.dotted_string.split("."))
    return _der(0x06, bytes([40 * first + second, *rest]))


def _new_key(kind: str):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


class TestCA:
    """A CA with its files under ``directory``; see the module docstring."""

    __test__ = False  # not a test class, whatever its name

    def __init__(
        self, directory: Path, name: str = "s6tls test CA", parent: "TestCA | None" = None
    ) -> None:
        self.dir = directory
        self.parent = parent
        directory.mkdir(parents=True, exist_ok=True)
        self.key = _new_key("ec")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        signer = parent or self
        self.cert = (
            self._builder(subject, self.key.public_key(), NOW - DAY, NOW + 30 * DAY)
            .issuer_name(signer.cert.subject if parent else subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(signer.key, hashes.SHA256())
        )
        self.cert_path = self._write("ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))
        # What a leaf's CERTFILE carries after the leaf: the intermediates, not the root.
        self.chain_pem = b""
        ca = self
        while ca.parent is not None:
            self.chain_pem += ca.cert.public_bytes(serialization.Encoding.PEM)
            ca = ca.parent
        self.key_path = self._write_key("ca.key", self.key)
        (directory / "index.txt").write_text("")
        (directory / "serial").write_text("1000\n")
        (directory / "crlnumber").write_text("1000\n")
        self.conf = self._write("ca.cnf", CA_CONF.format(dir=directory).encode())

    def _builder(self, subject, public_key, not_before, not_after) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )

    def _write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def _write_key(self, name: str, key) -> str:
        path = self.dir / name
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
        return str(path)

    def issue(
        self,
        stem: str,
        *sans: str,
        subject: x509.Name | None = None,
        not_before: datetime.datetime = NOW - DAY,
        not_after: datetime.datetime = NOW + DAY,
        key_type: str = "ec",
        ocsp_signing: bool = False,
    ) -> Leaf:
        """A leaf for ``sans`` (``DNS:a.example``, ``URI:spiffe://...``), as STEM.pem/.key."""
        key = _new_key(key_type)
        subject = subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if ocsp_signing:
            usage = [ExtendedKeyUsageOID.OCSP_SIGNING]
        builder = (
            self._builder(subject, key.public_key(), not_before, not_after)
            .issuer_name(self.cert.subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        pem = cert.public_bytes(serialization.Encoding.PEM) + self.chain_pem
        cert_path = self._write(f"{stem}.pem", pem)
        return Leaf(cert, key, cert_path, self._write_key(f"{stem}.key", key))

    def issue_with_two_sans(self, stem: str, first: str, second: str) -> Leaf:
        """A leaf with two subjectAltName extensions, which RFC 5280 forbids.

        cryptography makes no such certificate and parses none (it raises):
        the second is made under another OID of the same length, which is
        then put right in the signed bytes, signed again by this CA.
        """
        placeholder = x509.ObjectIdentifier("2.5.29.99")
        key = _new_key("ec")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
        second_san = x509.SubjectAlternativeName([_san(second)]).public_bytes()
        draft = (
            self._builder(subject, key.public_key(), NOW - DAY, NOW + DAY)
            .issuer_name(self.cert.subject)
            .add_extension(x509.SubjectAlternativeName([_san(first)]), critical=False)
            .add_extension(x509.UnrecognizedExtension(placeholder, second_san), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        signed = draft.tbs_certificate_bytes
        assert signed.count(_oid_der(placeholder)) == 1
        san_oid = _oid_der(x509.ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        tbs = signed.replace(_oid_der(placeholder), san_oid)
        der = draft.public_bytes(serialization.Encoding.DER)
        after_tbs = der[der.index(signed) + len(signed) :]  # the algorithm, then the signature
        algorithm = after_tbs[: len(after_tbs) - len(_der(0x03, b"\x00" + draft.signature))]
        signature = self.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        body = tbs + algorithm + _der(0x03, b"\x00" + signature)
        pem = b"-----BEGIN CERTIFICATE-----\n"
        pem += base64.encodebytes(_der(0x30, body)) + b"-----END CERTIFICATE-----\n"
        cert_path = self._write(f"{stem}.pem", pem)
        return Leaf(draft, key, cert_path, self._write_key(f"{stem}.key", key))

    # --- the real openssl ca / ocsp over this CA's database ------------------------------

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    def register(self, cert_path: str) -> None:
        """Enter a certificate it issued in the database as valid (``openssl ca -valid``)."""
        self._openssl("ca", "-config", self.conf, "-valid", cert_path)

    def revoke(self, cert_path: str) -> None:
        """Revoke a certificate it issued (``openssl ca -revoke``)."""
        self._openssl("ca", "-config", self.conf, "-revoke", cert_path)

    def gencrl(self, name: str = "crl.pem") -> str:
        """A CRL of the revoked leaves, valid for a day (``openssl ca -gencrl``)."""
        out = str(self.dir / name)
        self._openssl("ca", "-config", self.conf, "-gencrl", "-out", out)
        return out

    def ocsp_response(self, leaf: Leaf, name: str, signer: Leaf | None = None) -> str:
        """The DER OCSP response for ``leaf``, for a day (``openssl ocsp``).

        Signed by the CA, or by ``signer``, a responder it issued with ``ocsp_signing``.
        """
        request, response = str(self.dir / f"{name}.req"), str(self.dir / name)
        rsigner, rkey = (
            (signer.cert_path, signer.key_path) if signer else (self.cert_path, self.key_path)
        )
        self._openssl(
            "ocsp", "-issuer", self.cert_path, "-cert", leaf.cert_path, "-no_nonce",
            "-reqout", request,
        )  # fmt: skip
        self._openssl(
            "ocsp", "-index", str(self.dir / "index.txt"), "-rsigner", rsigner,
            "-rkey", rkey, "-CA", self.cert_path, "-reqin", request,
            "-respout", response, "-ndays", "1",
        )  # fmt: skip
        return response

    # --- what openssl cannot make: dates in the past ------------------------------------

    def expired_crl(self, name: str = "expired-crl.pem") -> str:
        """A CRL whose nextUpdate has passed."""
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(NOW - 2 * DAY)
            .next_update(NOW - DAY)
            .sign(self.key, hashes.SHA256())
        )
        return self._write(name, crl.public_bytes(serialization.Encoding.PEM))

    def stale_ocsp_response(self, leaf: Leaf, name: str) -> str:
        """A good OCSP response for ``leaf`` whose nextUpdate has passed."""
        response = (
            ocsp.OCSPResponseBuilder()
            .add_response(
                cert=leaf.cert,
                issuer=self.cert,
                algorithm=hashes.SHA1(),
                cert_status=ocsp.OCSPCertStatus.GOOD,
                this_update=NOW - 2 * DAY,
                next_update=NOW - DAY,
                revocation_time=None,
                revocation_reason=None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, self.cert)
            .sign(self.key, hashes.SHA256())
        )
        return self._write(name, response.public_bytes(serialization.Encoding.DER))

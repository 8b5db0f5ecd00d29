"""OCSP responses: the server's own, to staple, and the one a client requires.

Parsing is cryptography's; the signature is checked with cryptography's
primitives against the certificate's issuer, or against a responder
certificate that the issuer signed for OCSP signing (RFC 6960 section
4.2.2.2).  Each function returns why a response is not acceptable, or None.
"""

import datetime

# ec.ECDSA() imports the backend on first use: import it now, before any
# privilege drop, not in the middle of a handshake.
import cryptography.hazmat.backends.openssl.backend  # noqa: F401
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

# How far a response's thisUpdate may lie in the future (clock skew).
SKEW = datetime.timedelta(minutes=5)


def response_for(der: bytes, cert: x509.Certificate) -> ocsp.OCSPResponse:
    """The successful OCSP response in ``der``, checked to be about ``cert``.

    Raises ``ValueError`` with why not: unreadable, not successful, or about
    another certificate (serial number and issuer name hash).
    """
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError:
        raise ValueError("is not a DER OCSP response") from None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise ValueError(f"is an unsuccessful OCSP response ({response.response_status.name})")
    digest = hashes.Hash(response.hash_algorithm)
    digest.update(cert.issuer.public_bytes())
    if response.serial_number != cert.serial_number or (
        response.issuer_name_hash != digest.finalize()
    ):
        raise ValueError("is an OCSP response about another certificate")
    return response


def status_problem(response: ocsp.OCSPResponse, now: datetime.datetime) -> str | None:
    """Why the response does not vouch for its certificate now, or None if it does."""
    status = response.certificate_status
    if status == ocsp.OCSPCertStatus.REVOKED:
        return "the certificate is revoked"
    if status != ocsp.OCSPCertStatus.GOOD:
        return "the responder does not know the certificate"
    if response.this_update_utc > now + SKEW:
        return "the OCSP response is not valid yet"
    if response.next_update_utc is None or response.next_update_utc < now:
        return "the OCSP response is stale (past its nextUpdate, or without one)"
    return None


def signature_problem(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> str | None:
    """Why the response is not signed by ``issuer`` or its OCSP responder, or None."""
    signer = issuer
    if not _names_signer(response, issuer):
        signer = next((c for c in response.certificates if _names_signer(response, c)), None)
        if signer is None:
            return "the OCSP response is signed by an unknown responder"
        try:
            signer.verify_directly_issued_by(issuer)
            eku = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            return "the OCSP responder's certificate is not one the issuer made for OCSP"
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            return "the OCSP responder's certificate is not one the issuer made for OCSP"
    if not _signed_by(response, signer.public_key()):
        return "the OCSP response's signature does not verify"
    return None


def check_stapled(
    der: bytes, cert: x509.Certificate, issuer: x509.Certificate, now: datetime.datetime
) -> str | None:
    """A client's whole check of a stapled response (TLS_OCSP=require), or None if good."""
    if not der:
        return "the server stapled no OCSP response"
    try:
        response = response_for(der, cert)
    except ValueError as exc:
        return f"the stapled response {exc}"
    return signature_problem(response, issuer) or status_problem(response, now)


def _names_signer(response: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if response.responder_name is not None:
        return response.responder_name == cert.subject
    key_hash = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    return response.responder_key_hash == key_hash


def _signed_by(response: ocsp.OCSPResponse, key: object) -> bool:
    data, signature = response.tbs_response_bytes, response.signature
    algorithm = response.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(signature, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True

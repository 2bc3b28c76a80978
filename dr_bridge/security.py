"""TLS and XML signing material for the bridge, and faster signing than openleadr's default.

* :func:`make_pki` writes a small PKI (CA, VTN and VEN certificates, ECDSA P-256 by
  default) for tests, the demo and lab setups; production certificates come from the
  utility's OpenADR PKI.
* :func:`fast_create_message` is openleadr's ``create_message`` with the private key
  parsed once per process instead of on every message: with RSA that parse (and its
  key checks) is ~80 ms of CPU per message, which caps a process at a few VENs per second.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from openleadr import messaging, utils
from openleadr.preflight import preflight_message
from signxml.algorithms import SignatureConstructionMethod as methods  # noqa: N813
from signxml.algorithms import SignatureMethod
from signxml.signer import XMLSigner

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    vtn_cert: Path
    vtn_key: Path
    ven_cert: Path
    ven_key: Path

    @property
    def vtn_fingerprint(self) -> str:
        return fingerprint(self.vtn_cert)

    @property
    def ven_fingerprint(self) -> str:
        return fingerprint(self.ven_cert)


def fingerprint(cert_path: Path | str) -> str:
    """The OpenADR fingerprint (last 10 bytes of the SHA-256, colon-separated) of a PEM certificate."""
    return str(utils.certificate_fingerprint(Path(cert_path).read_bytes()))


def _key(kind: str) -> PrivateKey:
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key kind {kind!r} is not ecdsa or rsa")


def _write_key(key: PrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _cert(subject: str, key: PrivateKey, issuer_key: PrivateKey, issuer: x509.Name | None, *,
          ca: bool = False, hosts: list[str] | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if hosts:
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path | str, *, kind: str = "ecdsa", hosts: list[str] | None = None) -> Pki:
    """A CA and one VTN and one VEN certificate signed by it, as PEM files in ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = _key(kind)
    ca = _cert("metertwin-test-ca", ca_key, ca_key, None, ca=True)
    files: dict[str, Path] = {"ca_cert": out / "ca.pem"}
    files["ca_cert"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, names in (("vtn", hosts or ["127.0.0.1", "localhost"]), ("ven", ["dr-bridge"])):
        key = _key(kind)
        cert = _cert(f"metertwin-{role}", key, ca_key, ca.subject, hosts=names)
        files[f"{role}_key"] = out / f"{role}.key"
        files[f"{role}_cert"] = out / f"{role}.pem"
        _write_key(key, files[f"{role}_key"])
        files[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Pki(**files)


@functools.lru_cache(maxsize=16)
def _loaded(key: bytes, passphrase: bytes | None) -> tuple[Any, str]:
    loaded = serialization.load_pem_private_key(key, password=passphrase)
    algorithm = messaging.get_signature_algorithm_from_private_key(key, passphrase)
    return loaded, algorithm


@functools.cache
def read_pem(path: str) -> bytes:
    """PEM files read once per process (a thousand VENs share one certificate and key)."""
    return Path(path).read_bytes()


def fast_create_message(message_type: str, cert: bytes | None = None, key: bytes | None = None,
                        passphrase: str | None = None, disable_signature: bool = False,
                        shape: Callable[..., str] | None = None, shape_args: dict[str, Any] | None = None,
                        **message_payload: Any) -> str:
    """openleadr.messaging.create_message, with the private key parsed once (cached) instead of per message.

    ``shape(message_type, signed_object, **shape_args)`` may rewrite the rendered object before it is
    signed (see :func:`dr_bridge.oadr_xml.shape_signed_object`).
    """
    message_payload = preflight_message(message_type, message_payload)
    template = messaging.TEMPLATES.get_template(f"{message_type}.xml")
    signed_object = utils.flatten_xml(template.render(**message_payload))
    if shape is not None:
        signed_object = shape(message_type, signed_object, **(shape_args or {}))
    envelope = messaging.TEMPLATES.get_template("oadrPayload.xml")
    signature = None
    if cert and key and not disable_signature:
        from lxml import etree

        loaded, algorithm = _loaded(bytes(key), utils.ensure_bytes(passphrase) if passphrase else None)
        signer = XMLSigner(method=methods.detached,
                           c14n_algorithm="http://www.w3.org/TR/2001/REC-xml-c14n-20010315")
        signer.namespaces["oadr"] = "http://openadr.org/oadr-2.0b/2012/07"
        signer.sign_alg = SignatureMethod.from_fragment(algorithm)  # type: ignore[no-untyped-call]
        tree = etree.fromstring(signed_object)
        signature_tree = signer.sign(tree, key=loaded, cert=cert.decode(), reference_uri="#oadrSignedObject",
                                     signature_properties=messaging._create_replay_protect())
        signature = etree.tostring(signature_tree).decode("utf-8")
    return str(envelope.render(template=message_type, signature=signature, signed_object=signed_object))

"""The device's credential in the websocket handshake: an Ed25519 challenge-response (docs/protocol.md).

A device enrolled with `python -m coordinator enrol` holds an Ed25519 private key; the coordinator keeps
only its public key. Each connection takes two HTTP requests on the websocket's URL:

1. without `Authorization`: the coordinator answers 401 with
   `WWW-Authenticate: FwdFed-Ed25519 nonce="<nonce>"` (32 random bytes, base64url without padding);
2. with `Authorization: FwdFed-Ed25519 <device>.<nonce>.<time>.<signature>`: the device id's UTF-8 bytes
   in base64url, the nonce as received, the device's clock in whole Unix seconds (decimal), and the
   Ed25519 signature (base64url) of the ASCII bytes `fwdfed-auth-v1.<device>.<nonce>.<time>`.

The coordinator accepts a nonce it issued at most NONCE_TTL_S ago, once, and a time within
MAX_CLOCK_SKEW_S of its own clock: an answer seen on the wire, in a log or at a proxy is worth nothing
afterwards, and a key that is not the enrolled one signs nothing that verifies.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SCHEME = "FwdFed-Ed25519"
CONTEXT = "fwdfed-auth-v1"  # what the signed string starts with: a signature made for nothing else
NONCE_BYTES = 32
NONCE_TTL_S = 30.0  # a device answers its challenge at once; an older nonce is stale
MAX_CLOCK_SKEW_S = 300  # Kerberos' default: phones' clocks drift, but not by more than minutes
_B64 = re.compile(r"[A-Za-z0-9_-]+")
_CHALLENGE = re.compile(rf'\s*{SCHEME}\s+nonce="([A-Za-z0-9_-]+)"\s*', re.IGNORECASE)


class HandshakeError(ValueError):
    """A challenge or an answer that is not in the format above; the message says which part."""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: str, what: str) -> bytes:
    if not _B64.fullmatch(text):
        raise HandshakeError(f"the {what} is not base64url without padding")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise HandshakeError(f"the {what} is not base64url without padding") from None


def new_nonce() -> str:
    return b64(secrets.token_bytes(NONCE_BYTES))


def challenge_header(nonce: str) -> str:
    """The `WWW-Authenticate` value of the coordinator's 401."""
    return f'{SCHEME} nonce="{nonce}"'


def parse_challenge(header: str) -> str:
    """The nonce of a `WWW-Authenticate` value, or HandshakeError."""
    match = _CHALLENGE.fullmatch(header or "")
    if match is None or len(unb64(match.group(1), "nonce")) != NONCE_BYTES:
        raise HandshakeError(f"the coordinator's challenge is not '{SCHEME} nonce=\"<{NONCE_BYTES} bytes, "
                             f"base64url>\"': {header[:100]!r}")
    return match.group(1)


def signed_text(device: str, nonce: str, time: int) -> bytes:
    """The exact bytes the device signs: its base64url id, the nonce and the time, after the context."""
    return f"{CONTEXT}.{device}.{nonce}.{time}".encode("ascii")


def answer(key: Ed25519PrivateKey, device_id: str, nonce: str, time: int) -> str:
    """The `Authorization` value answering `nonce` as `device_id` at `time` (Unix seconds)."""
    device = b64(device_id.encode("utf-8"))
    return f"{SCHEME} {device}.{nonce}.{time}.{b64(key.sign(signed_text(device, nonce, time)))}"


class Answer:
    """A parsed `Authorization: FwdFed-Ed25519 ...` value, not yet verified."""

    def __init__(self, credentials: str):
        parts = credentials.strip().split(".")
        if len(parts) != 4:
            raise HandshakeError("the answer is not <device>.<nonce>.<time>.<signature>")
        device, self.nonce, time, signature = parts
        try:
            self.device_id = unb64(device, "device id").decode("utf-8")
        except UnicodeDecodeError:
            raise HandshakeError("the device id is not UTF-8") from None
        if not re.fullmatch(r"-?[0-9]{1,12}", time):
            raise HandshakeError("the time is not whole Unix seconds")
        self.time = int(time)
        self.signature = unb64(signature, "signature")
        self._signed = signed_text(device, self.nonce, time)

    def verifies(self, public_key: Ed25519PublicKey) -> bool:
        try:
            public_key.verify(self.signature, self._signed)
        except InvalidSignature:
            return False
        return True


def scheme_of(header: str) -> tuple[str, str]:
    """(scheme in lower case, the rest) of an `Authorization` value."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), rest.strip()


def new_device_key() -> tuple[str, str]:
    """A device's key pair: (private key as PKCS#8 PEM, public key as 64 hex digits of its raw 32 bytes)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
    return private, raw_public_hex(key.public_key())


def raw_public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))


def load_device_key(pem: str) -> Ed25519PrivateKey:
    """A device's private key from its PEM text, or HandshakeError."""
    try:
        key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm, UnicodeEncodeError):
        raise HandshakeError("not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise HandshakeError("not an Ed25519 key")
    return key

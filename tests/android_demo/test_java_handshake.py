"""The Java device answers the coordinator's challenge as fwdfed/handshake.py does (docs/protocol.md, The
handshake): its answers verify with the device's enrolled public key, name its device id (non-ASCII too) and
time, and bind the nonce; a malformed challenge and a key that is not Ed25519 PKCS#8 PEM are refused in one
line. The Java device's connections with its key are in test_java_device.py and test_java_hostile.py."""

from __future__ import annotations

import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from fwdfed import handshake


def answers(java_core, tmp_path, credential: str, device_id: str, when: int, *challenges: str) -> list[str]:
    path = tmp_path / "credential.pem"
    path.write_text(credential)
    result = java_core.run("HandshakeCheck", path, device_id, str(when), *challenges, check=False)
    return result.stdout.decode().splitlines()


def test_java_answers_verify_with_the_enrolled_key_and_bind_the_nonce(java_core, tmp_path):
    private, public = handshake.new_device_key()
    key = handshake.public_key_from_hex(public)
    nonces = [handshake.new_nonce() for _ in range(2)]
    when = int(time.time())
    lines = answers(java_core, tmp_path, private, "téléphone-1", when, *map(handshake.challenge_header, nonces),
                    f'fwdfed-ed25519   nonce="{nonces[0]}" ', "Bearer", 'FwdFed-Ed25519 nonce="short"')
    assert [line.split(" ", 1)[0] for line in lines] == ["ok", "ok", "ok", "error", "error"]
    assert lines[3] == ("error the coordinator's challenge is not 'FwdFed-Ed25519 nonce=\"<32 bytes, base64url>\"': "
                        "Bearer")
    parsed = [handshake.Answer(handshake.scheme_of(line[3:])[1]) for line in lines[:3]]
    assert all(a.verifies(key) for a in parsed)
    assert [(a.device_id, a.nonce, a.time) for a in parsed] == [("téléphone-1", n, when) for n in (*nonces, nonces[0])]
    # The same bytes as the Python device signs (Ed25519 is deterministic).
    ours = handshake.answer(handshake.load_device_key(private), "téléphone-1", nonces[0], when)
    assert lines[0][3:] == ours
    other = handshake.public_key_from_hex(handshake.new_device_key()[1])
    assert not parsed[0].verifies(other)


def test_a_key_that_is_not_ed25519_pkcs8_is_refused_in_one_line(java_core, tmp_path):
    ec = generate_private_key(SECP256R1()).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()).decode()
    challenge = handshake.challenge_header(handshake.new_nonce())
    for credential in (ec, "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"):
        (line,) = answers(java_core, tmp_path, credential, "d", 0, challenge)
        assert line.startswith("key error: the device's private key is not"), line

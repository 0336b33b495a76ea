#!/usr/bin/env python3
"""Known-answer vectors for PTLS, computed from ptls-spec.md with Python's `cryptography`
package, independently of lockbridge's Rust code.

Writes ptls_vectors.json next to this file. Every value is deterministic: ephemeral and
long-term keys are fixed scalars, randoms are fixed, and ECDSA uses RFC 6979 deterministic
signing, so a re-run reproduces the file byte for byte (the test command checks this).

The Rust test (tests/ptls_vectors.rs) recomputes every field and also runs the real client and
server against these transcripts, feeding each side the other side's frames from this file.
"""

import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

CURVE = ec.SECP256R1()


def key(scalar_hex):
    return ec.derive_private_key(int(scalar_hex, 16), CURVE)


def point(k):
    return k.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def sign(k, data):
    return k.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def sha256(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def vec16(b):
    return struct.pack(">H", len(b)) + b


def derive(z, label, h):
    assert len(label) == 16
    m = hmac.new(z, label + h, hashlib.sha256).digest()
    return m[0:16], m[16:28]


def nonce(iv, n):
    iv = bytearray(iv)
    iv[10] ^= (n >> 8) & 0xFF
    iv[11] ^= n & 0xFF
    return bytes(iv)


def seal(k, iv, n, plaintext):
    return AESGCM(k).encrypt(nonce(iv, n), plaintext, None)


def tlv(tag, value):
    return bytes([tag, len(value)]) + value


def certificate(authority, device_id, not_before, not_after, perms, client_id, client_point):
    body = (
        tlv(0x01, b"\x01")
        + tlv(0x02, struct.pack(">I", device_id))
        + tlv(0x03, struct.pack(">Q", not_before))
        + tlv(0x04, struct.pack(">Q", not_after))
        + tlv(0x05, struct.pack(">I", perms))
        + tlv(0x06, client_id)
        + tlv(0x7E, client_point)
    )
    return body + tlv(0x7F, sign(authority, body))


def fragments(blob, server_mtu):
    piece = server_mtu - 1
    pieces = [blob[i : i + piece] for i in range(0, len(blob), piece)]
    if len(pieces) < 2:
        pieces = [blob[: len(blob) // 2], blob[len(blob) // 2 :]]
    return [bytes([0x06]) + p for p in pieces[:-1]] + [bytes([0x07]) + pieces[-1]]


def main():
    inp = {
        "client_ephemeral_scalar": "11" * 32,
        "server_ephemeral_scalar": "22" * 32,
        "client_long_term_scalar": "33" * 32,
        "lock_long_term_scalar": "44" * 32,
        "authority_scalar": "55" * 32,
        "client_random": "a1" * 32,
        "server_random": "b2" * 32,
        "client_att_mtu": 247,
        "lock_att_mtu": 247,
        "auth_unix_ms": 1795219200000,
        "device_id": 4242,
        "cert_not_before": 1795215600000,
        "cert_not_after": 1796083200000,
        "cert_permissions": 7,
        "cert_client_id": "c3" * 16,
        "session_id": "0badcafe",
    }
    ce = key(inp["client_ephemeral_scalar"])
    se = key(inp["server_ephemeral_scalar"])
    cl = key(inp["client_long_term_scalar"])
    lk = key(inp["lock_long_term_scalar"])
    au = key(inp["authority_scalar"])

    client_mtu = min(inp["client_att_mtu"] - 3, 255)
    ch = (
        bytes([0x02, client_mtu, 0x00])
        + bytes.fromhex(inp["client_random"])
        + point(ce)
        + bytes(52)
    )
    assert len(ch) == 152
    server_mtu = min(inp["lock_att_mtu"] - 3, 255)
    if client_mtu:
        server_mtu = min(server_mtu, client_mtu)
    sh = bytes([0x02, server_mtu, 0x00]) + bytes.fromhex(inp["server_random"]) + point(se)
    assert len(sh) == 100

    z = ce.exchange(ec.ECDH(), se.public_key())
    assert z == se.exchange(ec.ECDH(), ce.public_key())
    hello_hash = sha256(ch, sh)
    c_hs = derive(z, b"ptlsc hs traffic", hello_hash)
    s_hs = derive(z, b"ptlss hs traffic", hello_hash)

    auth = struct.pack(">Q", inp["auth_unix_ms"])
    sig_s_input = ch + sh + vec16(auth)
    sig_s = sign(lk, sig_s_input)
    sv = vec16(auth) + vec16(sig_s) + vec16(hello_hash)
    sv_sealed = seal(s_hs[0], s_hs[1], 0, sv)
    hello_verify_hash = sha256(ch, sh, sv)

    cert = certificate(
        au,
        inp["device_id"],
        inp["cert_not_before"],
        inp["cert_not_after"],
        inp["cert_permissions"],
        bytes.fromhex(inp["cert_client_id"]),
        point(cl),
    )
    sig_c_input = ch + sh + sv + vec16(cert)
    sig_c = sign(cl, sig_c_input)
    cv = vec16(cert) + vec16(sig_c) + vec16(hello_verify_hash)
    cv_sealed = seal(c_hs[0], c_hs[1], 0, cv)
    hs_hash = sha256(ch, sh, sv, cv)
    c_ap = derive(z, b"ptlsc ap traffic", hs_hash)
    s_ap = derive(z, b"ptlss ap traffic", hs_hash)

    session_id = bytes.fromhex(inp["session_id"])
    # Application records: client GET_STATE (counter 0), lock response (counter 0), then a
    # notification on the same lock->client counter (1), then client UNLOCK (counter 1).
    get_state = bytes([0x5A])
    response = bytes([0x5A, 0x00, 0x06, 0x00])
    notification = bytes([0xBA, 0x04, 0x00])
    unlock = bytes([0x51, 0x00])

    out = {
        "generator": "tests/vectors/gen_ptls_vectors.py (Python cryptography, RFC 6979 ECDSA)",
        "inputs": inp,
        "client_ephemeral_public": point(ce).hex(),
        "server_ephemeral_public": point(se).hex(),
        "client_long_term_public": point(cl).hex(),
        "lock_long_term_public": point(lk).hex(),
        "authority_public": point(au).hex(),
        "client_hello": ch.hex(),
        "server_hello": sh.hex(),
        "z": z.hex(),
        "hello_hash": hello_hash.hex(),
        "client_hs_key": c_hs[0].hex(),
        "client_hs_iv": c_hs[1].hex(),
        "server_hs_key": s_hs[0].hex(),
        "server_hs_iv": s_hs[1].hex(),
        "sig_s_input": sig_s_input.hex(),
        "sig_s": sig_s.hex(),
        "server_verify_plain": sv.hex(),
        "server_verify_sealed": sv_sealed.hex(),
        "hello_verify_hash": hello_verify_hash.hex(),
        "certificate": cert.hex(),
        "sig_c_input": sig_c_input.hex(),
        "sig_c": sig_c.hex(),
        "client_verify_plain": cv.hex(),
        "client_verify_sealed": cv_sealed.hex(),
        "client_verify_frames": [f.hex() for f in fragments(cv_sealed, server_mtu)],
        "hs_hash": hs_hash.hex(),
        "client_ap_key": c_ap[0].hex(),
        "client_ap_iv": c_ap[1].hex(),
        "server_ap_key": s_ap[0].hex(),
        "server_ap_iv": s_ap[1].hex(),
        "nonce_examples": [
            {"iv": c_ap[1].hex(), "counter": n, "nonce": nonce(c_ap[1], n).hex()}
            for n in (0, 1, 0x0102, 0xFEFF)
        ],
        "frames": {
            "client_hello": ("03" + ch.hex()),
            "server_hello": ("03" + sh.hex()),
            "challenge": ("05" + auth.hex()),
            "server_verify": ("05" + sv_sealed.hex()),
            "initialized": ("08" + session_id.hex()),
            "get_state": "01" + seal(c_ap[0], c_ap[1], 0, get_state).hex(),
            "get_state_response": "01" + seal(s_ap[0], s_ap[1], 0, response).hex(),
            "notification": "01" + seal(s_ap[0], s_ap[1], 1, notification).hex(),
            "unlock": "01" + seal(c_ap[0], c_ap[1], 1, unlock).hex(),
        },
        "plaintexts": {
            "get_state": get_state.hex(),
            "get_state_response": response.hex(),
            "notification": notification.hex(),
            "unlock": unlock.hex(),
        },
        "signed_time": {
            "datetime": auth.hex(),
            "signature": sign(au, auth).hex(),
        },
    }
    text = json.dumps(out, indent=2, sort_keys=True) + "\n"
    target = Path(__file__).with_name("ptls_vectors.json")
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        if target.read_text() != text:
            sys.exit(f"{target} differs from what the generator computes now")
        print(f"{target.name}: reproduced byte for byte")
        return
    target.write_text(text)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()

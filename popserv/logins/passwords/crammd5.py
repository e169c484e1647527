"""
CRAM-MD5 (RFC 2195) without the plaintext: Dovecot's ``{CRAM-MD5}`` scheme.

HMAC-MD5 of a challenge is MD5(K^opad, MD5(K^ipad, challenge)).  The two
MD5 states after the first 64-byte block (K^ipad, K^opad) depend only on
the password, so Dovecot stores them (32 bytes: the outer state, then the
inner one, each as four 32-bit words little-endian; hex-encoded) and
finishes both hashes per login.
``hashlib`` cannot resume from a saved state, so the MD5 compression
function (RFC 1321) is here, used only for those two blocks' continuations.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct

_MASK = 0xFFFFFFFF
_INIT = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_SHIFTS = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_CONSTANTS = [int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64)]
_BLOCK = 64
_IPAD = bytes(0x36 for _ in range(_BLOCK))
_OPAD = bytes(0x5C for _ in range(_BLOCK))

#: The stored form's length: two MD5 states of 16 bytes, hex-encoded.
CONTEXT_HEX_LENGTH = 64

State = tuple[int, int, int, int]


def _compress(state: State, block: bytes) -> State:
    """One MD5 compression of a 64-byte block (RFC 1321 section 3.4)."""
    words = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | ~d), (7 * i) % 16
        f = (f + a + _CONSTANTS[i] + words[g]) & _MASK
        shift = _SHIFTS[i]
        a, d, c = d, c, b
        b = (b + ((f << shift) | (f >> (32 - shift)))) & _MASK
    return (
        (state[0] + a) & _MASK,
        (state[1] + b) & _MASK,
        (state[2] + c) & _MASK,
        (state[3] + d) & _MASK,
    )


def _finish(state: State, data: bytes, already: int) -> bytes:
    """The MD5 digest of ``already`` bytes (hashed into ``state``) followed by ``data``."""
    total = already + len(data)
    padded = data + b"\x80" + b"\0" * ((55 - total) % _BLOCK) + struct.pack("<Q", total * 8)
    for start in range(0, len(padded), _BLOCK):
        state = _compress(state, padded[start : start + _BLOCK])
    return struct.pack("<4I", *state)


def _xor(key: bytes, pad: bytes) -> bytes:
    return bytes(k ^ p for k, p in zip(key.ljust(_BLOCK, b"\0"), pad, strict=True))


def context(password: bytes) -> str:
    """The ``{CRAM-MD5}`` stored form of ``password`` (without the prefix): 64 hex digits."""
    if len(password) > _BLOCK:
        password = hashlib.md5(password, usedforsecurity=False).digest()
    inner = _compress(_INIT, _xor(password, _IPAD))
    outer = _compress(_INIT, _xor(password, _OPAD))
    return struct.pack("<8I", *outer, *inner).hex()


def digest_from_context(stored: str, challenge: bytes) -> bytes:
    """HMAC-MD5 of ``challenge`` under the password whose context is ``stored``."""
    if len(stored) != CONTEXT_HEX_LENGTH:
        raise ValueError("a CRAM-MD5 context is 64 hex digits")
    words = struct.unpack("<8I", bytes.fromhex(stored))
    inner = _finish(words[4:], challenge, _BLOCK)
    return _finish(words[:4], inner, _BLOCK)


def check_response(stored: str, challenge: bytes, response_hex: bytes) -> bool:
    """Whether the client's hex digest answers ``challenge`` for the stored context."""
    expected = digest_from_context(stored, challenge).hex().encode("ascii")
    return hmac.compare_digest(expected, response_hex.lower())

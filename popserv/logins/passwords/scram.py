"""
SCRAM keys (RFC 5802): what a server keeps so SCRAM works without the
plaintext, in Dovecot's ``{SCRAM-SHA-256}`` / ``{SCRAM-SHA-1}`` form
``ITERATIONS,SALT,STOREDKEY,SERVERKEY`` (the last three base64).

Pure; the crypto is ``hashlib`` and ``hmac``.  PBKDF2 with thousands of
iterations takes milliseconds: servers call :meth:`ScramKeys.derive` from a
thread pool.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from attrs import frozen
from scramp.utils import ScramException, saslprep

#: SCRAM mechanism hash -> hashlib name.
HASHES = {"SHA-1": "sha1", "SHA-256": "sha256"}

#: RFC 7677 section 4 (and Dovecot's default): at least 4096 iterations.
DEFAULT_ITERATIONS = 4096

#: Iteration counts accepted from a stored entry: enough to resist brute
#: force at the low end, and not a denial of service at the high end.
MIN_ITERATIONS, MAX_ITERATIONS = 1, 10_000_000

SALT_BYTES = 16

#: Salts for keys derived on the fly (from a PLAIN password, or for a user
#: that does not exist) come from this per-process secret: stable for a
#: user while the server runs, unpredictable, the same kind of value either way.
_SALT_SECRET = secrets.token_bytes(32)


def derived_salt(hash_name: str, username: str) -> bytes:
    """The salt of keys not stored but derived for ``username``."""
    material = f"{hash_name}:{username}".encode("utf-8", "surrogatepass")
    return hmac.new(_SALT_SECRET, material, hashlib.sha256).digest()[:SALT_BYTES]


def normalize(password: str | bytes) -> bytes:
    """
    RFC 5802's Normalize(): SASLprep as a stored string, UTF-8 encoded.
    ValueError (UnicodeDecodeError included) for a password it refuses.
    """
    if isinstance(password, bytes):
        password = password.decode("utf-8")
    try:
        prepared: str = saslprep(password)  # scramp is not annotated
    except ScramException as e:
        raise ValueError(f"SASLprep refuses the password: {e}") from None
    return prepared.encode("utf-8")


@frozen
class ScramKeys:
    """One user's SCRAM identity for one hash: salt, iteration count, StoredKey, ServerKey."""

    hash_name: str
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @classmethod
    def derive(
        cls,
        hash_name: str,
        password: str | bytes,
        salt: bytes | None = None,
        iterations: int = DEFAULT_ITERATIONS,
    ) -> ScramKeys:
        """The keys of ``password`` (SASLprep'd as RFC 5802 asks)."""
        digest = HASHES[hash_name]
        salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
        salted = hashlib.pbkdf2_hmac(digest, normalize(password), salt, iterations)
        client_key = hmac.new(salted, b"Client Key", digest).digest()
        return cls(
            hash_name,
            salt,
            iterations,
            hashlib.new(digest, client_key).digest(),
            hmac.new(salted, b"Server Key", digest).digest(),
        )

    @classmethod
    def decoy(cls, hash_name: str, salt: bytes) -> ScramKeys:
        """Keys that look real (``salt``, the usual iteration count) and no proof matches."""
        junk = secrets.token_bytes(hashlib.new(HASHES[hash_name]).digest_size)
        return cls(hash_name, salt, DEFAULT_ITERATIONS, junk, junk)

    @classmethod
    def parse(cls, hash_name: str, stored: str) -> ScramKeys:
        """Read Dovecot's stored form (after the ``{SCRAM-...}`` prefix); ValueError if bad."""
        fields = stored.strip().split(",")
        if len(fields) != 4:
            raise ValueError("a SCRAM entry is ITERATIONS,SALT,STOREDKEY,SERVERKEY")
        iterations = int(fields[0])
        if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            raise ValueError("SCRAM iteration count out of range")
        try:
            salt, stored_key, server_key = (base64.b64decode(f, validate=True) for f in fields[1:])
        except binascii.Error:
            raise ValueError("SCRAM entry is not base64") from None
        size = hashlib.new(HASHES[hash_name]).digest_size
        if len(stored_key) != size or len(server_key) != size or not salt:
            raise ValueError("SCRAM keys of the wrong length")
        return cls(hash_name, salt, iterations, stored_key, server_key)

    def to_stored(self) -> str:
        """Dovecot's stored form, without the prefix."""
        b64 = base64.b64encode
        return (
            f"{self.iterations},{b64(self.salt).decode()},"
            f"{b64(self.stored_key).decode()},{b64(self.server_key).decode()}"
        )

    def matches(self, password: str | bytes) -> bool:
        """Whether ``password`` has these keys (a USER/PASS login on a SCRAM-only entry)."""
        try:
            other = ScramKeys.derive(self.hash_name, password, self.salt, self.iterations)
        except (UnicodeDecodeError, ValueError):
            return False
        return hmac.compare_digest(other.stored_key, self.stored_key)

    def client_key_from(self, auth_message: bytes, proof: bytes) -> bytes:
        """ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage)."""
        signature = hmac.new(self.stored_key, auth_message, HASHES[self.hash_name]).digest()
        return bytes(a ^ b for a, b in zip(proof, signature, strict=True))

    def verify(self, auth_message: bytes, proof: bytes) -> bool:
        """RFC 5802 section 3: H(ClientProof XOR ClientSignature) == StoredKey."""
        if len(proof) != len(self.stored_key):
            return False
        client_key = self.client_key_from(auth_message, proof)
        computed = hashlib.new(HASHES[self.hash_name], client_key).digest()
        return hmac.compare_digest(computed, self.stored_key)

    def server_signature(self, auth_message: bytes) -> bytes:
        return hmac.new(self.server_key, auth_message, HASHES[self.hash_name]).digest()

"""Authenticated encryption of objects (docs/format.md §15).

Each object is sealed with a key of its own: ``BLAKE3(key=K, salt)`` where ``K`` is the
repository's encryption key and ``salt`` 16 random bytes stored in front of the
ciphertext. A fresh key per object means a nonce can never repeat, however many hosts
write at once, so the AEAD nonce is fixed (12 zero bytes). The AEAD is AES-256-GCM or
ChaCha20-Poly1305 (the ``cryptography`` package); its associated data binds the
ciphertext to what the object is (the caller says: a blob's id, a record's kind and
repository), so an object moved elsewhere does not open.

Sealed layout: ``salt (16) | ciphertext | tag (16)``: 32 bytes more than the plaintext.
"""

from __future__ import annotations

import os

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .errors import IntegrityError

ALGORITHMS = ("aes-256-gcm", "chacha20-poly1305")
SALT = 16
TAG = 16
OVERHEAD = SALT + TAG
_NONCE = bytes(12)


class Cipher:
    """Seals and opens objects under one repository key; safe to share between threads."""

    def __init__(self, algorithm: str, key: bytes) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown encryption {algorithm!r} (known: "
                             f"{', '.join(ALGORITHMS)})")
        if len(key) != 32:
            raise ValueError("an encryption key is 32 bytes")
        self.algorithm = algorithm
        self._key = key
        self._aead = AESGCM if algorithm == "aes-256-gcm" else ChaCha20Poly1305

    def _object_key(self, salt: bytes | memoryview) -> bytes:
        return bytes(blake3.blake3(salt, key=self._key).digest())

    def seal(self, plaintext: bytes | bytearray | memoryview, aad: bytes,
             prefix: bytes = b"") -> bytearray:
        """``prefix`` (left in the clear) followed by the sealed plaintext, written into one
        buffer without copying the plaintext first."""
        salt = os.urandom(SALT)
        start = len(prefix) + SALT
        out = bytearray(start + len(plaintext) + TAG)
        out[:len(prefix)] = prefix
        out[len(prefix):start] = salt
        self._aead(self._object_key(salt)).encrypt_into(_NONCE, plaintext, aad,
                                                        memoryview(out)[start:])
        return out

    def open(self, sealed: bytes | memoryview, aad: bytes, what: str) -> bytes:
        """The plaintext, or IntegrityError: damaged, tampered with, or not sealed here."""
        view = memoryview(sealed)
        if len(view) < OVERHEAD:
            raise IntegrityError(f"{what}: too short to be an encrypted object", key=what)
        try:
            return self._aead(self._object_key(view[:SALT])).decrypt(_NONCE, view[SALT:], aad)
        except InvalidTag:
            raise IntegrityError(f"{what}: authentication failed (damaged, tampered with, or "
                                 "not of this repository)", key=what) from None

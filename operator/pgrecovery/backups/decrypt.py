"""Decrypt the OpenSSL `enc` format (`openssl enc -aes256 -md md5|sha256 -pass …`), streaming.

Why this module exists: a9s-pg backups are `gzip | openssl enc -aes256 -md md5`, split into
parts. We decrypt them in-process instead of running `openssl` because the key must never be
on a command line and because the decryption has to be part of one streaming pipeline with
checks a shell pipe cannot make (fail fast on a wrong key, name the cause of bad padding).

Format [verified, reference/formats.md]: `Salted__` + 8-byte salt, then AES-256-CBC
ciphertext with PKCS#7 padding. Key and IV come from EVP_BytesToKey with one round of the
digest: D1 = H(pass‖salt), Di = H(Di-1‖pass‖salt); key‖iv = D1‖D2‖D3… (48 bytes).

`cryptography`'s AES decryptor releases the GIL, so this runs on its own thread next to the
decompressor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from pgrecovery.backups.config import Digest, EncryptionKey
from pgrecovery.errors import BackupCorrupt, BackupIncomplete, WrongKey

MAGIC = b"Salted__"
HEADER_SIZE = 16
BLOCK = 16
KEY_SIZE = 32
IV_SIZE = 16
GZIP_MAGIC = b"\x1f\x8b"
# Byte 3 of a gzip header is the compression method; 8 (deflate) is the only one defined.
# Checking it too makes a wrong key pass by chance with probability 2^-24 instead of 2^-16.
GZIP_HEAD = b"\x1f\x8b\x08"

KEY_SECRET_HINT = "check spec.source.encryption.keySecretRef"  # noqa: S105 - a field name


def evp_bytes_to_key(password: bytes, salt: bytes, digest: Digest) -> tuple[bytes, bytes]:
    """OpenSSL's EVP_BytesToKey with count=1: (32-byte key, 16-byte IV)."""
    if digest is Digest.AUTO:
        raise ValueError("resolve Digest.AUTO before deriving a key")
    name = "md5" if digest is Digest.MD5 else "sha256"
    material = b""
    block = b""
    while len(material) < KEY_SIZE + IV_SIZE:
        block = hashlib.new(name, block + password + salt).digest()
        material += block
    return material[:KEY_SIZE], material[KEY_SIZE : KEY_SIZE + IV_SIZE]


@dataclass(frozen=True)
class CipherParams:
    """Everything needed to decrypt one backup; `repr` never shows the key."""

    digest: Digest
    key: bytes
    iv: bytes

    def __repr__(self) -> str:
        return f"CipherParams(digest={self.digest.value}, key=***, iv=***)"

    def decryptor(self) -> CipherContext:
        return Cipher(algorithms.AES(self.key), modes.CBC(self.iv)).decryptor()


def _first_block(params: CipherParams, block: bytes) -> bytes:
    ctx = params.decryptor()
    return ctx.update(block)


def resolve_cipher(head: bytes, key: EncryptionKey, digest: Digest = Digest.AUTO) -> CipherParams:
    """Check the key on the first block of part 0 and return the parameters that work.

    `head` is at least the first 32 bytes of the backup (header + first AES block). A key
    is accepted when the first decrypted block starts like a gzip stream. With `auto`, MD5
    (what a9s passes) is tried before SHA-256 (OpenSSL's default since 1.1.0).
    """
    if len(head) < HEADER_SIZE + BLOCK:
        raise BackupIncomplete(
            f"the backup is only {len(head)} bytes long: too short to be an encrypted dump"
        )
    if head[:8] != MAGIC:
        raise BackupCorrupt(
            "the backup does not begin with 'Salted__': it is not an `openssl enc` file, "
            "or its first part is missing (part numbering starts at 0 or 1)"
        )
    salt = head[8:HEADER_SIZE]
    block = head[HEADER_SIZE : HEADER_SIZE + BLOCK]
    password = key.reveal()
    candidates = [Digest.MD5, Digest.SHA256] if digest is Digest.AUTO else [digest]
    for candidate in candidates:
        params = CipherParams(candidate, *evp_bytes_to_key(password, salt, candidate))
        if _first_block(params, block).startswith(GZIP_HEAD):
            return params
    if digest is not Digest.AUTO:
        other = Digest.SHA256 if digest is Digest.MD5 else Digest.MD5
        params = CipherParams(other, *evp_bytes_to_key(password, salt, other))
        if _first_block(params, block).startswith(GZIP_HEAD):
            raise WrongKey(
                f"the key decrypts this backup only with digest {other.value}, but digest "
                f"{digest.value} was requested: set spec.source.encryption.digest to "
                f"{other.value} or auto"
            )
    raise WrongKey(
        "the encryption key does not decrypt this backup (first block is not gzip); "
        + KEY_SECRET_HINT
    )


class StreamDecryptor:
    """AES-256-CBC over a byte stream that arrives in arbitrary pieces, PKCS#7 at the end.

    The last decrypted block is held back until more ciphertext arrives, because only the
    very last block carries the padding. Output pieces are whole blocks, as `bytes` or as a
    memoryview that owns its buffer.
    """

    def __init__(self, params: CipherParams) -> None:
        self._ctx = params.decryptor()
        self._held = b""
        self.ciphertext_bytes = 0

    def update(self, data: bytes | bytearray | memoryview) -> bytes | memoryview:
        """Decrypt `data`; return the plaintext blocks that are certainly not the last one.

        One allocation per call and no copy: the held block and the new plaintext are written
        into one buffer (`update_into`), and a view of it is returned (it owns the buffer).
        """
        n = len(data)
        self.ciphertext_bytes += n
        if not n:
            return b""
        held = len(self._held)
        buf = bytearray(held + n + BLOCK - 1)  # update_into wants block_size - 1 spare bytes
        view = memoryview(buf)
        view[:held] = self._held
        total = held + self._ctx.update_into(data, view[held:])
        if total <= BLOCK:
            self._held = bytes(view[:total])
            return b""
        self._held = bytes(view[total - BLOCK : total])
        return view[: total - BLOCK]

    def finalize(self, *, last_part: str = "the last part") -> bytes:
        """Check that the ciphertext is whole blocks and the padding is valid; return the rest."""
        if self.ciphertext_bytes % BLOCK:
            raise BackupIncomplete(
                f"the ciphertext is {self.ciphertext_bytes} bytes, not a multiple of the AES "
                f"block size (16): {last_part} is truncated"
            )
        self._ctx.finalize()
        held = self._held
        pad = held[-1] if held else 0
        if not held or not 1 <= pad <= BLOCK or held[-pad:] != bytes([pad]) * pad:
            raise BackupCorrupt(
                "the decrypted stream does not end with valid PKCS#7 padding (OpenSSL's "
                f"'bad decrypt'): {last_part} is truncated or damaged"
            )
        return held[:-pad]

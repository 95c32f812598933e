"""OpenSSL `enc` decryption and gzip decoding (pgrecovery.backups.decrypt, .gunzip, .config)."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pydantic import SecretStr

from pgrecovery.backups.config import Digest, EncryptionKey, S3Credentials
from pgrecovery.backups.decrypt import (
    CipherParams,
    StreamDecryptor,
    evp_bytes_to_key,
    resolve_cipher,
)
from pgrecovery.backups.gunzip import GzipStreamDecoder
from pgrecovery.errors import BackupCorrupt, BackupIncomplete, WrongKey

pytestmark = pytest.mark.unit

SALT = bytes.fromhex("0102030405060708")


# Vectors printed by `openssl enc -aes-256-cbc -md MD -P -S 0102030405060708 -pass file:F`
# (OpenSSL 3.0) with F containing "password\n".
@pytest.mark.parametrize(
    ("digest", "key", "iv"),
    [
        (
            Digest.MD5,
            "E7B0971E52CA5CC8D0539FB3412F6316F7BA2E6EE293D9F3457B99436B51CE02",
            "8D450E2ED75A84A923D4EAC9FE49226B",
        ),
        (
            Digest.SHA256,
            "2435177F1410536BAAD2ACC155C0F94783D58384573CB0F72157443606285D3F",
            "F96EFC044E0F1613BF324245C95E7411",
        ),
    ],
)
def test_evp_bytes_to_key_matches_openssl(digest: Digest, key: str, iv: str) -> None:
    assert evp_bytes_to_key(b"password", SALT, digest) == (bytes.fromhex(key), bytes.fromhex(iv))


def test_evp_bytes_to_key_runbook_style_key() -> None:
    key, iv = evp_bytes_to_key(
        b"NYHD8MVmA55HEqoaYHpQaxfwEMcQ1wkI", bytes.fromhex("a1b2c3d4e5f60718"), Digest.MD5
    )
    assert key.hex().upper() == "E4643ED8172ADB416F76BB943FBB018398B5FEB295C147057DF81CB4B85E1349"
    assert iv.hex().upper() == "DDB76EDCE08D997516D2B91F06C1E124"


def test_evp_bytes_to_key_agrees_with_openssl_binary(tmp_path: Path) -> None:
    keyfile = tmp_path / "k"
    keyfile.write_bytes(b"s3cr3t with spaces\n")
    out = subprocess.run(
        ["openssl", "enc", "-aes-256-cbc", "-md", "sha256", "-P", "-S", "00ff00ff00ff00ff",
         "-pass", f"file:{keyfile}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    fields = dict(line.replace(" ", "").split("=") for line in out.splitlines())
    key, iv = evp_bytes_to_key(
        b"s3cr3t with spaces", bytes.fromhex("00ff00ff00ff00ff"), Digest.SHA256
    )
    assert (key.hex().upper(), iv.hex().upper()) == (fields["key"], fields["iv"])


def _openssl_like(plain: bytes, password: bytes, digest: Digest, salt: bytes = SALT) -> bytes:
    key, iv = evp_bytes_to_key(password, salt, digest)
    padder = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    body = enc.update(padder.update(plain) + padder.finalize()) + enc.finalize()
    return b"Salted__" + salt + body


def test_resolve_cipher_auto_md5_and_sha256() -> None:
    gz = gzip.compress(b"data" * 100)
    k = EncryptionKey.from_bytes(b"pw")
    assert resolve_cipher(_openssl_like(gz, b"pw", Digest.MD5), k).digest is Digest.MD5
    assert resolve_cipher(_openssl_like(gz, b"pw", Digest.SHA256), k).digest is Digest.SHA256


def test_explicit_md5_on_sha256_backup_says_so() -> None:
    head = _openssl_like(gzip.compress(b"x"), b"pw", Digest.SHA256)
    with pytest.raises(WrongKey, match="only with digest sha256, but digest md5 was requested"):
        resolve_cipher(head, EncryptionKey.from_bytes(b"pw"), Digest.MD5)


def test_wrong_key_fails_fast_without_showing_the_key() -> None:
    head = _openssl_like(gzip.compress(b"x"), b"right", Digest.MD5)
    with pytest.raises(WrongKey) as info:
        resolve_cipher(head, EncryptionKey.from_bytes(b"wrong-key-value"))
    assert str(info.value) == (
        "the encryption key does not decrypt this backup (first block is not gzip); "
        "check spec.source.encryption.keySecretRef"
    )
    assert "wrong-key-value" not in str(info.value)


def test_not_openssl_and_too_short() -> None:
    with pytest.raises(BackupCorrupt, match="does not begin with 'Salted__'"):
        resolve_cipher(b"x" * 64, EncryptionKey.from_bytes(b"k"))
    with pytest.raises(BackupIncomplete, match="too short"):
        resolve_cipher(b"Salted__1234", EncryptionKey.from_bytes(b"k"))


def test_key_never_in_repr() -> None:
    key = EncryptionKey.from_bytes(b"topsecret")
    params = resolve_cipher(_openssl_like(gzip.compress(b"x"), b"topsecret", Digest.MD5), key)
    creds = S3Credentials("AKIA", SecretStr("hidden"))
    for text in (repr(key), str(key), repr(params), repr(creds)):
        assert "topsecret" not in text
        assert "hidden" not in text
        assert params.key.hex() not in text


def test_key_file_content_is_read_like_openssl() -> None:
    assert EncryptionKey.from_file_content(b"abc\n").reveal() == b"abc"
    assert EncryptionKey.from_file_content(b"abc\r\nignored\n").reveal() == b"abc\r"
    assert EncryptionKey.from_file_content(b"abc").reveal() == b"abc"


@pytest.mark.parametrize("step", [1, 15, 16, 17, 4096])
def test_stream_decryptor_any_piece_size(step: int) -> None:
    plain = os.urandom(5000)
    blob = _openssl_like(plain, b"pw", Digest.MD5)
    params = CipherParams(Digest.MD5, *evp_bytes_to_key(b"pw", SALT, Digest.MD5))
    dec = StreamDecryptor(params)
    body = blob[16:]
    out = b"".join(dec.update(body[i : i + step]) for i in range(0, len(body), step))
    assert out + dec.finalize() == plain


def test_stream_decryptor_truncation_and_bad_padding() -> None:
    params_args = evp_bytes_to_key(b"pw", SALT, Digest.MD5)
    # Not random: with the last block cut off, the new last block is plaintext, and random
    # plaintext ends in a valid PKCS#7 pad (0x01, 0x0202, …) about once in 256 runs (CI saw it).
    # 'x' (0x78) is never a pad byte.
    blob = _openssl_like(b"x" * 100, b"pw", Digest.MD5)[16:]
    dec = StreamDecryptor(CipherParams(Digest.MD5, *params_args))
    dec.update(blob[:-5])
    with pytest.raises(BackupIncomplete, match="not a multiple of the AES block size"):
        dec.finalize(last_part="part x-3")
    dec = StreamDecryptor(CipherParams(Digest.MD5, *params_args))
    dec.update(blob[:-16])
    with pytest.raises(BackupCorrupt, match="PKCS#7 padding"):
        dec.finalize()


@pytest.mark.parametrize("use_isal", [True, False])
def test_gzip_decoder_multi_member_and_small_steps(use_isal: bool) -> None:
    data = os.urandom(20000) + b"a" * 300000
    blob = gzip.compress(data) + gzip.compress(b"second member")
    for step in (1, 3, 1000, len(blob)):
        dec = GzipStreamDecoder(out_chunk=4096, use_isal=use_isal)
        pieces = [p for i in range(0, len(blob), step) for p in dec.feed(blob[i : i + step])]
        dec.finish()
        assert b"".join(pieces) == data + b"second member"
        assert max(len(p) for p in pieces) <= 4096
        assert dec.members == 2


@pytest.mark.parametrize("use_isal", [True, False])
def test_gzip_decoder_errors(use_isal: bool) -> None:
    blob = gzip.compress(b"hello world\n" * 1000)

    def run(data: bytes) -> None:
        dec = GzipStreamDecoder(use_isal=use_isal)
        for _ in dec.feed(data):
            pass
        dec.finish()

    bad_crc = blob[:-8] + bytes([blob[-8] ^ 1]) + blob[-7:]
    bad_len = blob[:-4] + bytes([blob[-4] ^ 1]) + blob[-3:]
    with pytest.raises(BackupCorrupt, match="CRC32/length check failed"):
        run(bad_crc)
    with pytest.raises(BackupCorrupt, match="CRC32/length check failed"):
        run(bad_len)
    with pytest.raises(BackupIncomplete, match="ends before its trailer"):
        run(blob[:-3])
    with pytest.raises(BackupCorrupt, match="are not gzip"):
        run(blob + b"garbage")
    with pytest.raises(BackupCorrupt, match="stray byte"):
        run(blob + b"\x1f")
    with pytest.raises(BackupCorrupt, match="empty"):
        run(b"")

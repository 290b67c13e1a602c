"""A chunked repository's key material, and the passphrase envelope that wraps it.

The repository key is two random 32-byte keys (``secrets``): ``enc_key`` seals every object
(AES-256-GCM), ``id_key`` names every chunk (HMAC-SHA256 of its plaintext, so equal data
gives equal names inside one repository and names reveal nothing to anyone without the
key). Both are stored wrapped, as a small JSON envelope::

    {"format": "migrator-repokey", "version": 1, "repo": REPO-ID,
     "kdf": {"name": "scrypt", "n": 32768, "r": 8, "p": 1, "salt": B64},
     "aead": "aes-256-gcm", "nonce": B64, "ciphertext": B64}

The wrapping key is scrypt(passphrase, salt); the key material is sealed with it by
AES-256-GCM, the envelope's own fields (repo id, KDF parameters) as associated data, so none
of them can be changed without the passphrase noticing. A wrong passphrase fails the tag
(``WrongPassphrase``) before any other object of the repository is read or written.

The envelope comes from the store (``keys/repokey``) or a key file, i.e. from outside this
process: its KDF parameters are bounded before use, or a planted envelope could ask scrypt
for gigabytes of memory and minutes of CPU. Everything cryptographic is ``cryptography``'s;
nothing here is home-made.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from migrator.core.errors import BackupError, CorruptBackup

ENVELOPE_FORMAT = "migrator-repokey"
ENVELOPE_VERSION = 1
#: scrypt's cost for new envelopes: 32 MiB of memory, about 0.1 s here
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1
#: what an envelope read from outside may ask for: N a power of two up to 2**20, and at
#: most 256 MiB of scrypt memory (128 * N * r) in all
MAX_N, MAX_R, MAX_P, MAX_MEMORY = 2 ** 20, 32, 4, 256 << 20
MAX_ENVELOPE = 4096
KEY_LEN = 32


class WrongPassphrase(BackupError):
    """The passphrase (or key file) does not open the repository's key."""

    hint = ("check MIGRATOR_PASSPHRASE or the passphrase typed (or --key-file); nothing in "
            "the repository was read or written")


@dataclass(frozen=True)
class RepoKey:
    """The two keys of a repository (never written anywhere unwrapped)."""

    enc_key: bytes
    id_key: bytes

    @classmethod
    def generate(cls) -> RepoKey:
        return cls(secrets.token_bytes(KEY_LEN), secrets.token_bytes(KEY_LEN))

    def __repr__(self) -> str:  # keys stay out of logs and tracebacks
        return "RepoKey(...)"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * MAX_ENVELOPE:
        raise CorruptBackup(f"key envelope: {what} is not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise CorruptBackup(f"key envelope: {what} is not base64 ({e})") from e


def check_kdf(kdf: Any) -> tuple[int, int, int, bytes]:
    """(n, r, p, salt) of an envelope's KDF, or ``CorruptBackup`` when they are not scrypt
    parameters this program accepts (bounded: the envelope is input from outside)."""
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
        raise CorruptBackup("key envelope: the key derivation is not scrypt")
    n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
    for name, v, top in (("n", n, MAX_N), ("r", r, MAX_R), ("p", p, MAX_P)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise CorruptBackup(f"key envelope: scrypt {name}={v!r} is out of bounds "
                                f"(1..{top})", "the envelope was damaged or planted")
    assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
    if n < 2 or n & (n - 1) or 128 * n * r > MAX_MEMORY:
        raise CorruptBackup(f"key envelope: scrypt n={n}, r={r} is not a power of two within "
                            f"{MAX_MEMORY >> 20} MiB", "the envelope was damaged or planted")
    salt = _unb64(kdf.get("salt"), "salt")
    if not 16 <= len(salt) <= 64:
        raise CorruptBackup("key envelope: the salt has an implausible length")
    return n, r, p, salt


def _aad(repo_id: str, n: int, r: int, p: int, salt: bytes) -> bytes:
    """What the seal covers besides the keys: the repository and the KDF parameters."""
    return json.dumps(["repokey", ENVELOPE_VERSION, repo_id, n, r, p, _b64(salt)]).encode()


def _derive(passphrase: str, n: int, r: int, p: int, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=KEY_LEN, n=n, r=r, p=p).derive(passphrase.encode())


def wrap(key: RepoKey, passphrase: str, repo_id: str,
         cost: tuple[int, int, int] = (SCRYPT_N, SCRYPT_R, SCRYPT_P)) -> bytes:
    """The envelope (JSON bytes) holding ``key`` sealed under ``passphrase``."""
    if not passphrase:
        raise BackupError("an empty passphrase protects nothing",
                          "give a passphrase, or --encryption none for an unencrypted repository")
    n, r, p = cost
    salt = secrets.token_bytes(16)
    check_kdf({"name": "scrypt", "n": n, "r": r, "p": p, "salt": _b64(salt)})
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_derive(passphrase, n, r, p, salt)).encrypt(
        nonce, key.enc_key + key.id_key, _aad(repo_id, n, r, p, salt))
    doc = {"format": ENVELOPE_FORMAT, "version": ENVELOPE_VERSION, "repo": repo_id,
           "kdf": {"name": "scrypt", "n": n, "r": r, "p": p, "salt": _b64(salt)},
           "aead": "aes-256-gcm", "nonce": _b64(nonce), "ciphertext": _b64(sealed)}
    return (json.dumps(doc, indent=1) + "\n").encode()


def unwrap(envelope: bytes, passphrase: str, repo_id: str) -> RepoKey:
    """The key sealed in ``envelope``: ``WrongPassphrase`` when the passphrase does not open
    it, ``CorruptBackup`` when the envelope is malformed, hostile or of another repository."""
    if len(envelope) > MAX_ENVELOPE:
        raise CorruptBackup("key envelope is implausibly large")
    try:
        doc = json.loads(envelope)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptBackup(f"key envelope is not JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != ENVELOPE_FORMAT \
            or doc.get("version") != ENVELOPE_VERSION or doc.get("aead") != "aes-256-gcm":
        raise CorruptBackup("key envelope: unknown format, version or cipher",
                            "was it written by a newer migrator?")
    if doc.get("repo") != repo_id:
        raise CorruptBackup(f"key envelope belongs to repository {doc.get('repo')!r}, "
                            f"not {repo_id!r}", "give the key file of this repository")
    n, r, p, salt = check_kdf(doc.get("kdf"))
    nonce = _unb64(doc.get("nonce"), "nonce")
    sealed = _unb64(doc.get("ciphertext"), "ciphertext")
    if len(nonce) != 12 or len(sealed) != 2 * KEY_LEN + 16:
        raise CorruptBackup("key envelope: nonce or ciphertext has the wrong length")
    try:
        raw = AESGCM(_derive(passphrase, n, r, p, salt)).decrypt(
            nonce, sealed, _aad(repo_id, n, r, p, salt))
    except InvalidTag as e:
        raise WrongPassphrase("wrong passphrase: it does not open the repository key "
                              "(or the key envelope was altered)") from e
    return RepoKey(raw[:KEY_LEN], raw[KEY_LEN:])

"""Chunks: a byte stream cut by content, and each piece named, compressed and sealed.

Cutting: FastCDC (``pyfastcdc``, compiled) places cut points where the content says, not
at fixed offsets, so an insertion shifts only the chunks it touches and two copies of the
same files cut the same way wherever they sit in a tar stream. ``Chunker`` is push-based
(the repository's part sink is written to): it buffers what arrives, cuts the buffer, and
hands on every chunk but the last, which may have been cut short by the buffer's end and is
cut again with what follows. FastCDC's cut points depend only on the bytes since the chunk's
start, so this gives exactly the chunks of cutting the whole stream at once.

Naming and sealing (``Codec``):

- ``repokey`` mode: a chunk's id is HMAC-SHA256(id_key, plaintext), hex. Its object is
  ``0x01 | nonce(12) | AES-256-GCM(enc_key, nonce, zstd(plaintext), aad)`` with
  ``aad = 0x01 | b"chunk:" | id``: the tag binds the object to its name, so a store cannot
  answer one chunk's name with another chunk (nor an index with another backup's index,
  ``aad = b"index:" + backup id``). On reading, the tag is checked, the plaintext
  decompressed no further than the size its index declares, and its HMAC compared with the
  id once more.
- ``none`` mode: id = sha256(plaintext); object = ``0x02 | zstd(plaintext)``, checked by
  its hash on reading (damage is found; a deliberate forgery is not: that is what a key
  is for).

Naming the other objects (``Codec.name``): a backup id says which container was backed up
and when (``web-20261201T000000Z-ab12cd``), so in an encrypted repository its index and its
``writers/`` entry are not named by it but by HMAC-SHA256(name_key, kind + ":" + id), hex,
where ``name_key`` is derived from ``id_key`` by HKDF (a key of its own: a name can never
equal a chunk's id). Anyone who may list the store learns how many backups there are, and
nothing of what or when; the id itself is kept inside the sealed object.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterator

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pyfastcdc import FastCDC

from migrator.backup.keys import RepoKey
from migrator.core.errors import CorruptBackup

MIN_SIZE, AVG_SIZE, MAX_SIZE = 256 << 10, 1 << 20, 4 << 20
#: how much the chunker buffers before cutting (a few max-size chunks)
BUFFER = 16 << 20
SEALED = 1  # AES-256-GCM over zstd
PLAIN = 2  # zstd only (--encryption none)
NONCE = 12
TAG = 16
#: HKDF's info for the key that names indexes and writers (``Codec.name``)
NAMES_INFO = b"migrator-chunked object names v1"


def object_limit(raw_limit: int) -> int:
    """The largest object a chunk of ``raw_limit`` bytes can be (zstd's worst case
    expansion plus the header, nonce and tag): what ``get`` may read."""
    return raw_limit + (raw_limit >> 7) + 1024


def chunk_key(chunk_id: str) -> str:
    """Where a chunk lives in the store: ``data/ab/abcdef...``."""
    return f"data/{chunk_id[:2]}/{chunk_id}"


class Chunker:
    """Push bytes in (``feed``), take whole chunks out; ``finish`` flushes the rest."""

    def __init__(self, min_size: int = MIN_SIZE, avg_size: int = AVG_SIZE,
                 max_size: int = MAX_SIZE) -> None:
        self._cdc = FastCDC(avg_size, min_size=min_size, max_size=max_size)
        self._buf = bytearray()
        self._limit = max(BUFFER, 4 * max_size)

    def feed(self, data: bytes | memoryview) -> Iterator[bytes]:
        self._buf += data
        if len(self._buf) >= self._limit:
            yield from self._cut(final=False)

    def finish(self) -> Iterator[bytes]:
        yield from self._cut(final=True)

    def _cut(self, final: bool) -> Iterator[bytes]:
        view = memoryview(self._buf)
        try:
            pieces = [(c.offset, c.length) for c in self._cdc.cut_buf(view)]
            if not final and pieces:
                pieces.pop()  # may be cut short by the buffer's end: cut again later
            end = 0
            for off, length in pieces:
                yield bytes(view[off:off + length])
                end = off + length
        finally:
            view.release()
        del self._buf[:end]


class Codec:
    """Names, seals and opens a repository's objects (see the module docstring)."""

    def __init__(self, key: RepoKey | None, level: int = 3) -> None:
        self.key = key
        self._aead = AESGCM(key.enc_key) if key is not None else None
        self._name_key = None if key is None else HKDF(
            hashes.SHA256(), 32, salt=None, info=NAMES_INFO).derive(key.id_key)
        self.level = level

    @property
    def encrypted(self) -> bool:
        return self.key is not None

    def chunk_id(self, data: bytes | memoryview) -> str:
        if self.key is None:
            return hashlib.sha256(data).hexdigest()
        return hmac.new(self.key.id_key, data, hashlib.sha256).hexdigest()

    def name(self, kind: str, ident: str) -> str:
        """The keyed name of object ``ident`` of ``kind`` (``index``, ``writer``): 64 hex
        digits that reveal nothing of ``ident`` without the key (see the module docstring).
        Only an encrypted codec names objects so."""
        if self._name_key is None:
            raise ValueError("an unencrypted repository names its objects by their ids")
        return hmac.new(self._name_key, f"{kind}:{ident}".encode(), hashlib.sha256).hexdigest()

    # sealing ---------------------------------------------------------------------------
    def seal(self, data: bytes | memoryview, aad: bytes) -> bytes:
        """``data`` compressed and (repokey) encrypted, bound to ``aad``."""
        packed = zstandard.ZstdCompressor(level=self.level).compress(data)
        if self._aead is None:
            return bytes([PLAIN]) + packed
        nonce = secrets.token_bytes(NONCE)
        head = bytes([SEALED])
        return head + nonce + self._aead.encrypt(nonce, packed, head + aad)

    def open(self, blob: bytes, aad: bytes, limit: int, what: str) -> bytes:
        """The plaintext of ``blob``, at most ``limit`` bytes; ``CorruptBackup`` naming
        ``what`` when it is damaged, forged, of another name, or larger."""
        if not blob:
            raise CorruptBackup(f"{what}: empty object")
        if self._aead is None:
            if blob[0] != PLAIN:
                raise CorruptBackup(f"{what}: not an unencrypted object (format {blob[0]})")
            packed = blob[1:]
        else:
            if blob[0] != SEALED or len(blob) < 1 + NONCE + TAG:
                raise CorruptBackup(f"{what}: not a sealed object (format {blob[0]})")
            try:
                packed = self._aead.decrypt(blob[1:1 + NONCE], blob[1 + NONCE:],
                                            blob[:1] + aad)
            except InvalidTag as e:
                raise CorruptBackup(f"{what}: fails authentication (altered, or not the "
                                    "object of this name)") from e
        try:
            with zstandard.ZstdDecompressor().stream_reader(packed) as reader:
                out: bytes = reader.read(limit + 1)
        except zstandard.ZstdError as e:
            raise CorruptBackup(f"{what}: does not decompress ({e})") from e
        if len(out) > limit:  # a bomb, or a lie about the size: stopped at limit + 1
            raise CorruptBackup(f"{what}: decompresses beyond the {limit} bytes declared")
        return out

    def seal_chunk(self, chunk_id: str, data: bytes | memoryview) -> bytes:
        return self.seal(data, b"chunk:" + chunk_id.encode())

    def open_chunk(self, chunk_id: str, blob: bytes, size: int, rehash: bool = True) -> bytes:
        """A chunk's plaintext, checked: authentic, ``size`` bytes, and named by its id.
        ``rehash`` False skips the id's recomputation (a pass of HMAC-SHA256 over the
        plaintext) when the object is sealed: its tag already binds it to the id, and only
        a holder of the key could have sealed other bytes under it; a reader that hashes
        the whole part anyway (a restore's sha256) spares the CPU (see ``ChunkReader``).
        An unencrypted chunk is always rehashed: its hash is its only check."""
        what = f"chunk {chunk_id}"
        data = self.open(blob, b"chunk:" + chunk_id.encode(), size, what)
        if len(data) != size:
            raise CorruptBackup(f"{what}: holds {len(data)} bytes, the index says {size}")
        if (rehash or not self.encrypted) \
                and not hmac.compare_digest(self.chunk_id(data), chunk_id):
            raise CorruptBackup(f"{what}: its content does not match its name")
        return data


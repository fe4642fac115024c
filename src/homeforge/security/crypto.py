"""Encryption at rest: AES-256-GCM in authenticated chunks (the STREAM construction).

File format (all integers big-endian)::

    header (45 bytes)
      magic        8  b"\\x89HFENC\\r\\n"
      version      1  1
      flags        1  0
      chunk_size   4  plaintext bytes per chunk (the last chunk may be shorter, even empty)
      key_id       8  which data key (keys.key_id, first 8 bytes)
      salt        16  random; file key = HKDF-SHA256(data key, salt, "homeforge file v1")
      nonce_prefix 7  random
    chunk k (k = 0 .. n-1): ciphertext || 16-byte GCM tag
      nonce = nonce_prefix || uint32(k) || uint8(k == n-1)
      associated data = the whole header

Each chunk is bound to its position and to the header, and only the last chunk carries
the "final" flag, so an edited byte, swapped chunks, a cut-off tail or a file assembled
from two files all fail authentication. Writers stream (memory holds one chunk) and
replace the target atomically on close; readers stream, or read chunks at random
(``security.encrypted_array.EncryptedArray``) after checking every tag once on open.

Readers in homeforge call ``open_read`` / ``read_bytes`` / ``open_text``: plain files
pass through unchanged, encrypted ones are decrypted with the configured data key.
"""

from __future__ import annotations

import io
import os
import secrets
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from homeforge.errors import HomeforgeError
from homeforge.security.keys import DataKey, load_key

MAGIC = b"\x89HFENC\r\n"
VERSION = 1
HEADER = struct.Struct(">8sBBI8s16s7s")
HEADER_LEN = HEADER.size  # 45
TAG = 16
DEFAULT_CHUNK = 64 * 1024


class CryptoError(HomeforgeError):
    """An encrypted file that cannot be decrypted: wrong key, tampered or truncated."""


# --------------------------------------------------------------------------- primitives


def _file_key(key: DataKey, salt: bytes):
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"homeforge file v1").derive(key.secret)
    return AESGCM(k)


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if final else 0)


def _key(key: DataKey | None) -> DataKey:
    return key if key is not None else load_key(required=True)


def is_encrypted(path: str | Path) -> bool:
    """True if the file starts with the magic, or with something a few bytes away from it.

    A damaged magic must not turn an encrypted file into a "plain" one that readers pass
    through, so a near match counts as encrypted (and then fails on its header).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError:
        return False
    if len(head) < len(MAGIC):
        return False
    return sum(a != b for a, b in zip(head, MAGIC, strict=True)) <= 2


def read_header(path: str | Path, f=None) -> dict:
    own = f is None
    f = f or open(path, "rb")
    try:
        f.seek(0)
        raw = f.read(HEADER_LEN)
    finally:
        if own:
            f.close()
    if len(raw) < HEADER_LEN or raw[:8] != MAGIC:
        raise CryptoError(f"{path} is not a homeforge encrypted file, or its header is damaged or cut off", where=str(path),
                          fix="restore the file from a backup or re-run the stage that made it")
    magic, version, flags, chunk_size, kid, salt, prefix = HEADER.unpack(raw)
    if version != VERSION:
        raise CryptoError(f"{path} uses encryption format version {version}; this homeforge reads version {VERSION}",
                          where=str(path), fix="upgrade homeforge")
    if chunk_size <= 0:
        raise CryptoError(f"{path} has a corrupted header", where=str(path), fix="restore the file from a backup")
    return {"raw": raw, "chunk_size": chunk_size, "key_id": kid.hex(), "salt": salt, "prefix": prefix}


def _check_key(path, header: dict, key: DataKey) -> None:
    if key.key_id[:16] != header["key_id"]:
        raise CryptoError(
            f"{path} was encrypted with key {header['key_id']}, but the current data key is {key.key_id}",
            where=str(path),
            fix="set HOMEFORGE_KEY_FILE (or HOMEFORGE_KEY / HOMEFORGE_KEY_COMMAND) to the key that encrypted it; "
                "after a rotation, rotate this artifact too (`homeforge keys rotate ARTIFACT`)")


# --------------------------------------------------------------------------- writing


class EncryptedWriter(io.RawIOBase):
    """A write-only binary file that encrypts in chunks; the target appears only on ``close``."""

    def __init__(self, path: str | Path, key: DataKey | None = None, chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        self.path = Path(path)
        self.key = _key(key)
        self.chunk_size = chunk_size
        salt, prefix = secrets.token_bytes(16), secrets.token_bytes(7)
        self.header = HEADER.pack(MAGIC, VERSION, 0, chunk_size, bytes.fromhex(self.key.key_id[:16]), salt, prefix)
        self.prefix = prefix
        self.aead = _file_key(self.key, salt)
        self.tmp = self.path.with_name(f".{self.path.name}.enc-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.f = open(self.tmp, "wb")
        self.f.write(self.header)
        self.buf = bytearray()
        self.index = 0
        self.size = 0
        self._done = False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        mv = memoryview(data).cast("B")
        self.buf += mv
        self.size += len(mv)
        cs = self.chunk_size
        if len(self.buf) > cs:
            n_full = (len(self.buf) - 1) // cs  # always keep >= 1 byte pending: the final chunk is written on close
            for i in range(n_full):
                self._emit(bytes(self.buf[i * cs:(i + 1) * cs]), final=False)
            del self.buf[: n_full * cs]
        return len(mv)

    def _emit(self, chunk: bytes, final: bool) -> None:
        self.f.write(self.aead.encrypt(_nonce(self.prefix, self.index, final), chunk, self.header))
        self.index += 1
        if self.index >= 2**32:
            raise CryptoError(f"{self.path} is too large for one encrypted file", fix="raise the chunk size")

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._emit(bytes(self.buf), final=True)
            self.buf = bytearray()
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        finally:
            super().close()

    def abort(self) -> None:
        """Discard everything written; the target is not touched."""
        self._done = True
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)
        if not self.closed:
            super().close()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        else:
            self.close()
        return False


def open_write(path: str | Path, key: DataKey | None = None, chunk_size: int = DEFAULT_CHUNK) -> EncryptedWriter:
    return EncryptedWriter(path, key, chunk_size)


def write_encrypted(path: str | Path, data: bytes | Iterable[bytes], key: DataKey | None = None,
                    chunk_size: int = DEFAULT_CHUNK) -> None:
    """Encrypt ``data`` (bytes, or an iterable of byte blocks to stream) into ``path`` atomically."""
    with EncryptedWriter(path, key, chunk_size) as w:
        for block in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
            w.write(block)


def encrypt_file(path: str | Path, key: DataKey | None = None, chunk_size: int = DEFAULT_CHUNK,
                 dest: str | Path | None = None) -> None:
    """Encrypt a plain file in place, or into ``dest`` (streamed; atomic replace). Already-encrypted
    files are left alone (or copied to ``dest`` as they are)."""
    p = Path(path)
    if is_encrypted(p) or is_encrypted_log(p):
        if dest is not None:
            import shutil

            shutil.copyfile(p, dest)
        return
    with open(p, "rb") as src, EncryptedWriter(dest if dest is not None else p, key, chunk_size) as w:
        while block := src.read(1 << 20):
            w.write(block)


# --------------------------------------------------------------------------- reading


class _Chunks:
    """Random access to the authenticated chunks of one encrypted file."""

    def __init__(self, path: str | Path, key: DataKey | None = None):
        self.path = Path(path)
        self.f = open(self.path, "rb")
        try:
            self.h = read_header(self.path, self.f)
            self.key = _key(key)
            _check_key(self.path, self.h, self.key)
        except BaseException:
            self.f.close()
            raise
        self.cs = self.h["chunk_size"]
        body = os.fstat(self.f.fileno()).st_size - HEADER_LEN
        step = self.cs + TAG
        self.n = max(1, -(-body // step))
        last_len = body - (self.n - 1) * step
        if body < TAG or last_len < TAG:
            self.f.close()
            raise CryptoError(f"{self.path} is truncated: its last chunk is cut off", where=str(self.path),
                              fix="restore the file from a backup or re-run the stage that made it")
        self.size = (self.n - 1) * self.cs + last_len - TAG
        self.aead = _file_key(self.key, self.h["salt"])

    def chunk(self, k: int) -> bytes:
        from cryptography.exceptions import InvalidTag

        step = self.cs + TAG
        ct = os.pread(self.f.fileno(), step, HEADER_LEN + k * step)  # no shared file position: thread-safe
        final = k == self.n - 1
        try:
            return self.aead.decrypt(_nonce(self.h["prefix"], k, final), ct, self.h["raw"])
        except InvalidTag:
            pass
        truncated = False
        if final:
            try:
                self.aead.decrypt(_nonce(self.h["prefix"], k, False), ct, self.h["raw"])
                truncated = True
            except InvalidTag:
                pass
        what = ("is truncated: chunks after chunk {k} were cut off" if truncated
                else "failed authentication at chunk {k}: it was modified (tampered, corrupted or cut short), or chunks were reordered")
        raise CryptoError(f"{self.path} {what.format(k=k)}; nothing of it was used", where=str(self.path),
                          fix="restore the file from a backup or re-run the stage that made it")

    def verify_all(self) -> None:
        for k in range(self.n):
            self.chunk(k)

    def close(self) -> None:
        self.f.close()


class DecryptingReader(io.RawIOBase):
    """A sequential read-only binary stream over an encrypted file (memory: one chunk)."""

    def __init__(self, path: str | Path, key: DataKey | None = None):
        super().__init__()
        self._c = _Chunks(path, key)
        self._k = 0
        self._buf = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf and self._k < self._c.n:
            self._buf = self._c.chunk(self._k)
            self._k += 1
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._c.close()
        super().close()


def open_read(path: str | Path, key: DataKey | None = None):
    """A buffered binary file for reading: plain files as-is, encrypted ones decrypted on the fly."""
    if is_encrypted_log(path):
        return io.BufferedReader(LogReader(path, key), buffer_size=DEFAULT_CHUNK)
    if is_encrypted(path):
        return io.BufferedReader(DecryptingReader(path, key), buffer_size=DEFAULT_CHUNK)
    return open(path, "rb")


def open_text(path: str | Path, key: DataKey | None = None, encoding: str = "utf-8"):
    """A text file for reading (e.g. JSONL), decrypted on the fly if encrypted."""
    return io.TextIOWrapper(open_read(path, key), encoding=encoding)


def read_bytes(path: str | Path, key: DataKey | None = None) -> bytes:
    """The whole plaintext; for an encrypted file, every chunk is authenticated before returning."""
    if is_encrypted_log(path):
        with open_read(path, key) as f:
            return f.read()
    if not is_encrypted(path):
        return Path(path).read_bytes()
    c = _Chunks(path, key)
    try:
        return b"".join(c.chunk(k) for k in range(c.n))
    finally:
        c.close()


def iter_plain(path: str | Path, key: DataKey | None = None, block: int = 1 << 20) -> Iterator[bytes]:
    with open_read(path, key) as f:
        while data := f.read(block):
            yield data


def reencrypt(path: str | Path, old: DataKey, new: DataKey) -> bool:
    """Re-encrypt one file from ``old`` to ``new`` (streamed, atomic). False if it is plain or already under ``new``."""
    p = Path(path)
    if is_encrypted_log(p):
        return _reencrypt_log(p, old, new)
    if not is_encrypted(p):
        return False
    h = read_header(p)
    if h["key_id"] == new.key_id[:16]:
        return False
    with EncryptedWriter(p, new, h["chunk_size"]) as w:
        for data in iter_plain(p, old):
            w.write(data)
    return True


# --------------------------------------------------------------------------- append-only logs


LOG_MAGIC = b"\x89HFLOG\r\n"
LOG_HEADER = struct.Struct(">8sB8s16s16s")  # magic, version, key_id, salt, file_id
_REC = struct.Struct(">I")


def is_encrypted_log(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(LOG_MAGIC)) == LOG_MAGIC
    except OSError:
        return False


class EncryptedLog:
    """An append-only encrypted record log (feedback, request text, ...): JSONL, sealed line by line.

    Each appended record is sealed on its own with AES-256-GCM (random 96-bit nonce; the
    header and the record's sequence number are associated data), so appends need no
    rewrite, and an edited, reordered, removed-from-the-middle or foreign record fails
    authentication on read. Records cut from the *end* cannot be told from a shorter log:
    pair it with the audit log when that matters. Readers use ``open_text`` as for any
    JSONL file. Safe across threads and processes (flock).
    """

    def __init__(self, path: str | Path, key: DataKey | None = None):
        self.path = Path(path)
        self.key = _key(key)
        self._known: tuple[int, int] | None = None  # (file size, records) after our last append

        self._lock = threading.Lock()

    def append(self, record: bytes | str) -> None:
        from homeforge._fs import flock

        data = record.encode("utf-8") if isinstance(record, str) else bytes(record)
        if not data.endswith(b"\n"):
            data += b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.path, "a+b") as f:
            flock(f, True)
            try:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    header = LOG_HEADER.pack(LOG_MAGIC, 1, bytes.fromhex(self.key.key_id[:16]), secrets.token_bytes(16),
                                             secrets.token_bytes(16))
                    f.write(header)
                    os.chmod(self.path, 0o600)
                    n, size = 0, len(header)
                elif self._known is not None and self._known[0] == size:
                    n = self._known[1]
                else:
                    n = sum(1 for _ in _log_records(self.path, f))
                h = _log_header(self.path, f)
                _check_key(self.path, h, self.key)
                aead = _file_key(self.key, h["salt"])
                nonce = secrets.token_bytes(12)
                blob = nonce + aead.encrypt(nonce, data, h["raw"] + struct.pack(">Q", n))
                f.seek(0, os.SEEK_END)
                f.write(_REC.pack(len(blob)) + blob)
                f.flush()
                os.fsync(f.fileno())
                self._known = (size + _REC.size + len(blob), n + 1)
            finally:
                flock(f, False)


def _log_header(path, f) -> dict:
    f.seek(0)
    raw = f.read(LOG_HEADER.size)
    if len(raw) < LOG_HEADER.size or raw[:8] != LOG_MAGIC:
        raise CryptoError(f"{path} is not a homeforge encrypted log, or its header is damaged", where=str(path),
                          fix="restore the file from a backup")
    _, _version, kid, salt, file_id = LOG_HEADER.unpack(raw)
    return {"raw": raw, "key_id": kid.hex(), "salt": salt, "file_id": file_id}


def _log_records(path, f) -> Iterator[bytes]:
    f.seek(LOG_HEADER.size)
    while True:
        head = f.read(_REC.size)
        if not head:
            return
        (n,) = _REC.unpack(head) if len(head) == _REC.size else (None,)
        blob = f.read(n) if n is not None else b""
        if n is None or len(blob) != n or n < 28:
            raise CryptoError(f"{path} ends with a cut-off record", where=str(path),
                              fix="the last write was interrupted or the file was truncated; restore it from a backup")
        yield blob


class LogReader(io.RawIOBase):
    """Sequential plaintext of an ``EncryptedLog`` (records authenticated one by one)."""

    def __init__(self, path: str | Path, key: DataKey | None = None):
        super().__init__()
        self.path = Path(path)
        self.f = open(self.path, "rb")
        self.h = _log_header(self.path, self.f)
        key = _key(key)
        _check_key(self.path, self.h, key)
        self.aead = _file_key(key, self.h["salt"])
        self.records = _log_records(self.path, self.f)
        self.seq = 0
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        from cryptography.exceptions import InvalidTag

        while not self.buf:
            blob = next(self.records, None)
            if blob is None:
                return 0
            try:
                self.buf = self.aead.decrypt(blob[:12], blob[12:], self.h["raw"] + struct.pack(">Q", self.seq))
            except InvalidTag:
                raise CryptoError(f"record {self.seq + 1} of {self.path} failed authentication: it was modified, "
                                  "moved, or records before it were removed", where=str(self.path),
                                  fix="restore the file from a backup") from None
            self.seq += 1
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _reencrypt_log(p: Path, old: DataKey, new: DataKey) -> bool:
    with open(p, "rb") as f:
        if _log_header(p, f)["key_id"] == new.key_id[:16]:
            return False
    tmp = p.with_name(f".{p.name}.rekey-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        log = EncryptedLog(tmp, new)
        with open_read(p, old) as f:
            for line in f:
                log.append(line)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return True

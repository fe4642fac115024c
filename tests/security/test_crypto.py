"""Chunked AES-256-GCM: round trips, tamper/truncate/reorder/wrong key refused, keys and permissions."""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest

from homeforge.security import crypto, encrypted_array, keys
from homeforge.security.crypto import CryptoError


@pytest.fixture
def key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOMEFORGE_HOME", str(tmp_path / "home"))
    for var in ("HOMEFORGE_KEY", "HOMEFORGE_KEY_COMMAND", "HOMEFORGE_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)
    return keys.init_key()


@pytest.mark.parametrize("size", [0, 1, 1000, 4096, 4097, 3 * 4096, 50_000])
def test_round_trip_sizes(tmp_path, key, size):
    data = os.urandom(size)
    p = tmp_path / "f.bin"
    crypto.write_encrypted(p, data, key, chunk_size=4096)
    assert crypto.is_encrypted(p)
    assert size < 16 or data[:64] not in p.read_bytes()
    assert crypto.read_bytes(p, key) == data
    with crypto.open_read(p, key) as f:
        assert f.read() == data
    assert os.path.getsize(p) == crypto.HEADER_LEN + size + 16 * max(1, -(-size // 4096))


def test_streamed_write_in_pieces(tmp_path, key):
    data = os.urandom(100_003)
    p = tmp_path / "f.bin"
    with crypto.open_write(p, key, chunk_size=1000) as w:
        for i in range(0, len(data), 777):
            w.write(data[i : i + 777])
    assert crypto.read_bytes(p) == data  # key from the default key file


def test_text_reader(tmp_path, key):
    lines = [json.dumps({"text": f"patient {i} é"}) for i in range(500)]
    p = tmp_path / "r.jsonl"
    crypto.write_encrypted(p, ("\n".join(lines) + "\n").encode(), key, chunk_size=1024)
    with crypto.open_text(p) as f:
        assert [json.loads(x)["text"] for x in f] == [f"patient {i} é" for i in range(500)]


def test_plain_files_pass_through(tmp_path, key):
    p = tmp_path / "plain.txt"
    p.write_bytes(b"hello")
    assert not crypto.is_encrypted(p)
    assert crypto.read_bytes(p) == b"hello"
    with crypto.open_read(p) as f:
        assert f.read() == b"hello"


def test_one_byte_tampered_anywhere_is_refused(tmp_path, key):
    data = os.urandom(10_000)
    p = tmp_path / "f.bin"
    crypto.write_encrypted(p, data, key, chunk_size=1024)
    raw = p.read_bytes()
    for pos in (5, crypto.HEADER_LEN - 1, crypto.HEADER_LEN, crypto.HEADER_LEN + 3000, len(raw) - 1):
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        p.write_bytes(bytes(bad))
        with pytest.raises(CryptoError):
            crypto.read_bytes(p, key)
        with pytest.raises(CryptoError):
            with crypto.open_read(p, key) as f:
                f.read()


def test_truncation_is_refused(tmp_path, key):
    data = os.urandom(10_000)
    p = tmp_path / "f.bin"
    crypto.write_encrypted(p, data, key, chunk_size=1024)
    raw = p.read_bytes()
    step = 1024 + 16
    for cut in (crypto.HEADER_LEN + 3 * step, crypto.HEADER_LEN + 3 * step + 100, len(raw) - 1, 20):
        p.write_bytes(raw[:cut])
        with pytest.raises(CryptoError, match="truncated|cut off|cut short|not a homeforge"):
            crypto.read_bytes(p, key)


def test_reordered_chunks_are_refused(tmp_path, key):
    p = tmp_path / "f.bin"
    crypto.write_encrypted(p, os.urandom(5000), key, chunk_size=1024)
    raw = p.read_bytes()
    h, step = crypto.HEADER_LEN, 1040
    swapped = raw[:h] + raw[h + step : h + 2 * step] + raw[h : h + step] + raw[h + 2 * step :]
    p.write_bytes(swapped)
    with pytest.raises(CryptoError, match="chunk 0"):
        crypto.read_bytes(p, key)


def test_chunks_from_another_file_are_refused(tmp_path, key):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    crypto.write_encrypted(a, b"A" * 3000, key, chunk_size=1024)
    crypto.write_encrypted(b, b"B" * 3000, key, chunk_size=1024)
    ra, rb = a.read_bytes(), b.read_bytes()
    a.write_bytes(ra[: crypto.HEADER_LEN] + rb[crypto.HEADER_LEN :])
    with pytest.raises(CryptoError):
        crypto.read_bytes(a, key)


def test_wrong_key_is_named(tmp_path, key):
    p = tmp_path / "f.bin"
    crypto.write_encrypted(p, b"secret", key)
    other = keys.DataKey(b"\x01" * 32, keys.key_id(b"\x01" * 32), "test")
    with pytest.raises(CryptoError, match=f"encrypted with key {key.key_id}.*current data key is {other.key_id}"):
        crypto.read_bytes(p, other)


def test_missing_key_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HOMEFORGE_HOME", str(tmp_path / "nohome"))
    monkeypatch.delenv("HOMEFORGE_KEY_FILE", raising=False)
    monkeypatch.delenv("HOMEFORGE_KEY", raising=False)
    with pytest.raises(keys.KeyError_, match="no data key.*"):
        crypto.write_encrypted(tmp_path / "x", b"data")
    assert not (tmp_path / "x").exists()


def test_failed_write_leaves_nothing(tmp_path, key):
    p = tmp_path / "f.bin"
    with pytest.raises(RuntimeError):
        with crypto.open_write(p, key) as w:
            w.write(b"x" * 100_000)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [tmp_path / "home"]


def test_encrypted_array(tmp_path, key):
    tokens = np.arange(30_000, dtype=np.uint16)
    p = tmp_path / "train.bin"
    crypto.write_encrypted(p, tokens.tobytes(), key, chunk_size=4096)
    arr = encrypted_array.EncryptedArray(p, np.uint16, length=30_000, key=key, cache_chunks=2)
    assert len(arr) == 30_000
    for s, e in ((0, 10), (2040, 2060), (4095, 8200), (29_990, 30_000), (100, 100)):
        np.testing.assert_array_equal(arr[s:e], tokens[s:e])
    assert arr[-1] == 29_999 and arr[5] == 5
    np.testing.assert_array_equal(np.asarray(arr), tokens)
    with pytest.raises(CryptoError, match="not 29999 tokens"):
        encrypted_array.EncryptedArray(p, np.uint16, length=29_999, key=key)
    raw = bytearray(p.read_bytes())
    raw[-100] ^= 1
    p.write_bytes(bytes(raw))
    with pytest.raises(CryptoError):  # refused on open, before any token is used
        encrypted_array.EncryptedArray(p, np.uint16, key=key)


def test_streaming_memory_is_flat(tmp_path, key):
    p = tmp_path / "big.bin"
    block = os.urandom(1 << 20)
    tracemalloc.start()
    with crypto.open_write(p, key) as w:
        for _ in range(24):
            w.write(block)
    _, peak_write = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    total = 0
    for data in crypto.iter_plain(p, key):
        total += len(data)
    _, peak_read = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == 24 << 20
    assert peak_write < 4 << 20 and peak_read < 4 << 20, (peak_write, peak_read)


def test_reencrypt(tmp_path, key):
    p = tmp_path / "f.bin"
    crypto.write_encrypted(p, b"x" * 5000, key, chunk_size=1000)
    new = keys.DataKey(b"\x02" * 32, keys.key_id(b"\x02" * 32), "test")
    assert crypto.reencrypt(p, key, new)
    assert crypto.read_bytes(p, new) == b"x" * 5000
    with pytest.raises(CryptoError, match="encrypted with key"):
        crypto.read_bytes(p, key)
    assert not crypto.reencrypt(p, key, new)  # already under the new key


# --------------------------------------------------------------------------- keys


def test_key_file_is_private_and_not_overwritten(tmp_path, key):
    path = keys.default_key_file()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert keys.load_key().key_id == key.key_id
    with pytest.raises(keys.KeyError_, match="already exists"):
        keys.init_key()
    assert keys.load_key().secret == key.secret
    assert key.secret.hex() not in repr(key)


def test_loose_permissions_refused_unless_forced(tmp_path, key, monkeypatch):
    path = keys.default_key_file()
    os.chmod(path, 0o644)
    with pytest.raises(keys.KeyError_, match="chmod 600"):
        keys.load_key()
    with pytest.warns(UserWarning, match="forced"):
        assert keys.load_key(force=True).key_id == key.key_id
    monkeypatch.setenv("HOMEFORGE_KEY_INSECURE_OK", "1")
    with pytest.warns(UserWarning):
        keys.load_key()


def test_key_from_env_and_command(tmp_path, monkeypatch):
    secret = bytes(range(32))
    monkeypatch.setenv("HOMEFORGE_KEY", secret.hex())
    assert keys.load_key().secret == secret
    monkeypatch.delenv("HOMEFORGE_KEY")
    script = tmp_path / "kms.sh"
    script.write_text(f"#!/bin/sh\necho {secret.hex()}\n")
    script.chmod(0o700)
    monkeypatch.setenv("HOMEFORGE_KEY_COMMAND", str(script))
    k = keys.load_key()
    assert k.secret == secret and k.source == "command"
    monkeypatch.setenv("HOMEFORGE_KEY_COMMAND", "false")
    with pytest.raises(keys.KeyError_, match="exited with 1"):
        keys.load_key()
    monkeypatch.delenv("HOMEFORGE_KEY_COMMAND")
    monkeypatch.setenv("HOMEFORGE_KEY", "too-short")
    with pytest.raises(keys.KeyError_, match="not a 256-bit key"):
        keys.load_key()


def test_encrypted_log_append_read_tamper_rotate(tmp_path, key):
    p = tmp_path / "feedback.jsonl"
    log = crypto.EncryptedLog(p, key)
    recs = [{"prompt": f"patient {i}", "rating": i % 5} for i in range(20)]
    for r in recs[:10]:
        log.append(json.dumps(r))
    crypto.EncryptedLog(p, key).append(json.dumps(recs[10]))  # another writer (e.g. another process)
    for r in recs[11:]:
        log.append(json.dumps(r))
    assert b"patient" not in p.read_bytes() and oct(p.stat().st_mode & 0o777) == "0o600"
    with crypto.open_text(p, key) as f:
        assert [json.loads(x) for x in f] == recs
    assert crypto.read_bytes(p, key).count(b"\n") == 20
    crypto.encrypt_file(p, key)  # already encrypted: left alone
    with crypto.open_text(p, key) as f:
        assert len(f.readlines()) == 20
    new = keys.DataKey(b"\x03" * 32, keys.key_id(b"\x03" * 32), "test")
    assert crypto.reencrypt(p, key, new)
    with crypto.open_text(p, new) as f:
        assert [json.loads(x) for x in f] == recs
    with pytest.raises(CryptoError, match="encrypted with key"):
        crypto.read_bytes(p, key)
    raw = bytearray(p.read_bytes())
    raw[crypto.LOG_HEADER.size + 40] ^= 1  # inside the first record
    p.write_bytes(bytes(raw))
    with pytest.raises(CryptoError, match="record 1"):
        crypto.read_bytes(p, new)
    p.write_bytes(bytes(raw[:-3]))
    with pytest.raises(CryptoError):
        crypto.read_bytes(p, new)

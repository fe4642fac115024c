import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from homeforge import artifacts
from homeforge.errors import ArtifactError, HomeforgeError


def _make(out, config, inputs=None, force=False, content="hello"):
    with artifacts.write_artifact(out, stage="demo", config=config, inputs=inputs, force=force) as art:
        (art.dir / "a.txt").write_text(content)
        (art.dir / "sub").mkdir()
        (art.dir / "sub" / "b.bin").write_bytes(b"\x00\x01")
        art.metrics["m"] = 1.5
    return out


def test_manifest_contents(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("data")
    out = _make(tmp_path / "art", {"x": 1}, inputs={"src": src})
    m = artifacts.verify(out)
    assert m["stage"] == "demo" and m["config"] == {"x": 1} and m["metrics"] == {"m": 1.5}
    assert m["inputs"]["src"] == artifacts.sha256_file(src)
    assert set(m["files"]) == {"a.txt", "sub/b.bin"}
    assert m["versions"]["torch"] and m["versions"]["transformers"]
    assert m["host"]["cpu_count"] >= 1 and "total_s" in m["timings"]
    assert m["content_hash"] == artifacts.content_hash(m["files"])


def test_fingerprint_skip_if_unchanged(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("data")
    out = _make(tmp_path / "art", {"x": 1}, inputs={"src": src})
    _, fp, _ = artifacts.begin(out, stage="demo", config={"x": 1}, inputs={"src": src})
    assert artifacts.is_up_to_date(out, fp)
    _, fp2, _ = artifacts.begin(out, stage="demo", config={"x": 2}, inputs={"src": src})
    assert not artifacts.is_up_to_date(out, fp2)
    src.write_text("changed")
    _, fp3, _ = artifacts.begin(out, stage="demo", config={"x": 1}, inputs={"src": src})
    assert fp3 != fp and not artifacts.is_up_to_date(out, fp3)
    # a different config does not silently replace the artifact...
    with pytest.raises(HomeforgeError, match="--force"):
        _make(out, {"x": 2}, inputs={"src": src})
    # ...unless forced
    _make(out, {"x": 2}, inputs={"src": src}, force=True, content="new")
    assert (out / "a.txt").read_text() == "new"


def test_artifact_input_uses_content_hash(tmp_path):
    a = _make(tmp_path / "a", {"x": 1})
    assert artifacts.hash_input(a) == artifacts.read_manifest(a)["content_hash"]


def test_exception_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with artifacts.write_artifact(out, stage="demo", config={}) as art:
            (art.dir / "partial").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_no_partial_artifact(tmp_path):
    out = tmp_path / "art"
    script = textwrap.dedent(f"""
        import time
        from homeforge import artifacts
        with artifacts.write_artifact({str(out)!r}, stage="demo", config={{}}) as art:
            (art.dir / "half").write_text("x")
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # only a hidden temp dir remains...
    assert any(p.name.startswith(".art.tmp-") for p in tmp_path.iterdir())
    _make(out, {"x": 1})  # ...and the next writer cleans it up
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_corruption_detected(tmp_path):
    out = _make(tmp_path / "art", {"x": 1})
    (out / "a.txt").write_text("hellO")  # same size, different bytes
    artifacts.verify(out, deep=False)
    with pytest.raises(ArtifactError, match="a.txt does not match"):
        artifacts.verify(out)
    (out / "sub" / "b.bin").unlink()
    with pytest.raises(ArtifactError, match="b.bin is missing"):
        artifacts.verify(out, deep=False)


def test_half_written_and_edited_manifest_refused(tmp_path):
    d = tmp_path / "half"
    d.mkdir()
    (d / "a.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not a complete homeforge artifact"):
        artifacts.read_manifest(d)
    out = _make(tmp_path / "art", {"x": 1})
    m = json.loads((out / artifacts.MANIFEST).read_text())
    m["files"]["a.txt"] = "0" * 64
    (out / artifacts.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="edited"):
        artifacts.verify(out)
    (out / artifacts.MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        artifacts.read_manifest(out)


def test_unwritable_output_message(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(HomeforgeError, match="not writable"):
        _make(tmp_path / "art", {})
    assert not (tmp_path / "art").exists()


def test_atomic_write_text(tmp_path):
    p = tmp_path / "f.txt"
    artifacts.atomic_write_text(p, "one")
    artifacts.atomic_write_text(p, "two")
    assert p.read_text() == "two" and [x.name for x in tmp_path.iterdir()] == ["f.txt"]

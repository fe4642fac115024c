import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from homeforge import _fs, artifacts
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
    assert m["inputs"]["src"] == _fs.sha256_file(src)
    assert set(m["files"]) == {"a.txt", "sub/b.bin"}
    assert m["versions"]["torch"] and m["versions"]["transformers"]
    assert m["host"]["cpu_count"] >= 1 and "total_s" in m["timings"]
    assert m["content_hash"] == artifacts.content_hash(m["files"])


def test_fingerprint_skip_if_unchanged(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text("data")
    out = _make(tmp_path / "art", {"x": 1}, inputs={"src": src})
    assert artifacts.plan(out, stage="demo", config={"x": 1}, inputs={"src": src}).up_to_date
    assert not artifacts.plan(out, stage="demo", config={"x": 1}, inputs={"src": src}, force=True).up_to_date
    assert not artifacts.plan(out, stage="demo", config={"x": 2}, inputs={"src": src}).up_to_date
    hashes = artifacts.read_manifest(out)["inputs"]  # a plain artifact is never up to date for an encrypted run
    assert artifacts.fingerprint("demo", {"x": 1}, hashes) != artifacts.fingerprint("demo", {"x": 1}, hashes, True)
    # the same stage's artifact of the same inputs is replaced by a run with another config...
    _make(out, {"x": 2}, inputs={"src": src}, content="new config")
    assert (out / "a.txt").read_text() == "new config"
    # ...but not by a run from other inputs, unless forced
    src.write_text("changed")
    with pytest.raises(HomeforgeError, match="not this `demo` stage's output for these inputs"):
        _make(out, {"x": 1}, inputs={"src": src})
    assert (out / "a.txt").read_text() == "new config"
    _make(out, {"x": 1}, inputs={"src": src}, force=True, content="new")
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "input.txt"]  # the old artifact is gone


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("what", ["user folder", "other stage", "file"])
def test_never_replaces_what_it_did_not_write(tmp_path, what):
    """A user's folder, another stage's artifact or a file at the output path: refused before any work,
    left byte-identical; with force a foreign folder is moved aside, never deleted."""
    out = tmp_path / "out"
    if what == "user folder":
        (out / "notes").mkdir(parents=True)
        (out / "notes" / "thesis.md").write_text("years of work")
        (out / "todo.txt").write_text("x")
    elif what == "other stage":
        with artifacts.write_artifact(out, stage="other", config={}) as art:
            (art.dir / "weights.bin").write_bytes(b"\x01")
    else:
        out.write_text("a file")
    before = _tree(tmp_path)
    with pytest.raises(HomeforgeError, match="already exists") as exc:
        artifacts.plan(out, stage="demo", config={"x": 1})
    assert "--force" in exc.value.render()
    with pytest.raises(HomeforgeError, match="already exists"):
        _make(out, {"x": 1})
    assert _tree(tmp_path) == before
    plan = artifacts.plan(out, stage="demo", config={"x": 1}, force=True)
    with plan.write() as art:
        (art.dir / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new"
    if what == "other stage":  # homeforge's own artifact: replaced
        assert plan.moved_aside is None and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    else:  # never deleted: moved aside, byte-identical
        assert plan.moved_aside is not None and plan.moved_aside.parent == tmp_path
        moved = {k.replace(plan.moved_aside.name, "out", 1): v for k, v in _tree(tmp_path).items()
                 if k.startswith(plan.moved_aside.name)}
        assert moved == before


def test_empty_folder_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    _make(tmp_path / "out", {"x": 1})
    assert (tmp_path / "out" / "a.txt").is_file()


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
        from homeforge import _fs, artifacts
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
    _fs.atomic_write_text(p, "one")
    _fs.atomic_write_text(p, "two")
    assert p.read_text() == "two" and [x.name for x in tmp_path.iterdir()] == ["f.txt"]

"""No plaintext left behind by a killed `--encrypt prepare`; crash leftovers removed at the next start and
reported by `doctor`; raw inputs traced by `verify` from any working directory (issue 11)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from integrity_helpers import keys_init, run_cli  # noqa: E402

from homeforge.data.corpus import stdlib_docstrings  # noqa: E402

MARKER = f"PLAINTEXT-{uuid.uuid4().hex[:12]}"


def _holding(root: Path, needle: bytes) -> list[Path]:
    out = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and needle in p.read_bytes():
                out.append(p)
        except OSError:
            continue
    return out


def test_killed_encrypted_prepare_leaves_no_plaintext_on_the_output_disk(home, tmp_path):
    keys_init(home)
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = stdlib_docstrings(2_000_000)
    for i in range(0, len(texts), 20):  # real prose, each document carrying the marker
        (docs / f"d{i}.txt").write_text("\n\n".join(f"{t}\nReviewed as record {MARKER}." for t in texts[i:i + 20]))
    out_parent, shm = tmp_path / "out", tmp_path / "shm"  # shm stands for memory-backed storage (/dev/shm)
    env = {**os.environ, "HOMEFORGE_HOME": str(home), "HOMEFORGE_SCRATCH": str(shm), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "homeforge", "--encrypt", "prepare", str(docs), "-o",
                             str(out_parent / "data"), "--workers", "1", "tokenizer.vocab_size=300"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill -9 once plaintext work records are being written
            work = [p for root in (out_parent, shm) if root.exists() for p in root.rglob("records.jsonl")
                    if p.stat().st_size > 100_000]
            if work or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"prepare finished before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _holding(out_parent, MARKER.encode()) == []  # nothing in the clear beside the output
    leftovers = [p for p in shm.iterdir()] if shm.exists() else []
    assert leftovers and _holding(shm, MARKER.encode())  # the plaintext was in (simulated) memory only
    # the next homeforge command of any kind removes what the killed process left, and doctor says so
    r = subprocess.run([sys.executable, "-m", "homeforge", "doctor", "--path", str(out_parent)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert "crash leftovers" in r.stdout and "removed" in r.stdout, r.stdout + r.stderr
    assert not any(shm.iterdir()) and not list(out_parent.glob(".*tmp*"))
    assert not (out_parent / "data").exists()


def test_verify_traces_raw_inputs_from_any_directory(home, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    (work / "docs").mkdir(parents=True)
    for i, text in enumerate(stdlib_docstrings(60_000, min_chars=400)[:30]):
        (work / "docs" / f"n{i}.txt").write_text(text)
    monkeypatch.chdir(work)
    code, _, err = run_cli(capsys, "prepare", "docs", "-o", "data", "--workers", "1", "tokenizer.vocab_size=300",
                           "split.val=0", "split.test=0")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)  # verify from elsewhere: inputs were recorded relative to the artifact too
    code, out, err = run_cli(capsys, "verify", work / "data")
    assert code == 0, out + err
    from homeforge.security.provenance import verify_tree

    checks = verify_tree(work / "data")
    assert sum("is the recorded version" in c.detail and c.ok for c in checks) == 30
    (work / "docs" / "n3.txt").write_text("changed after the dataset was made")
    code, out, err = run_cli(capsys, "verify", work / "data")
    assert code == 1 and "input 'file:" in err and "has changed since data was made" in err
    (work / "docs" / "n3.txt").unlink()
    code, out, err = run_cli(capsys, "verify", work / "data")
    assert code == 1 and "is missing" in err and "--allow-missing-inputs" in err
    code, out, err = run_cli(capsys, "verify", work / "data", "--allow-missing-inputs")
    assert code == 0, out + err
    missing = [c for c in verify_tree(work / "data", allow_missing=True) if c.facts.get("missing")]
    assert len(missing) == 1 and missing[0].ok and "n3.txt" in missing[0].detail

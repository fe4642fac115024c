"""The security commands as a user runs them: real `homeforge` processes, a throwaway HOMEFORGE_HOME."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from homeforge.security import audit

HF = str(Path(sys.executable).parent / "homeforge")


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def run(home: Path, *args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("HOMEFORGE_")}
    e.update({"HOMEFORGE_HOME": str(home), "COLUMNS": "200", **(env or {})})
    return subprocess.run([HF, *args], env=e, capture_output=True, text=True, timeout=180, cwd=cwd)


def entries(home: Path) -> list[dict]:
    return list(audit.read_entries(home / "audit" / "audit.jsonl"))


def test_keys_init_status_and_audit_lines(home):
    r = run(home, "keys", "init")
    assert r.returncode == 0, r.stderr
    data_key, audit_key = home / "keys" / "data.key", home / "keys" / "audit.key"
    for p in (data_key, audit_key):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "keys").stat().st_mode) == 0o700
    secret = json.loads(data_key.read_text())["key"]
    assert secret not in r.stdout + r.stderr
    r2 = run(home, "keys", "init")
    assert r2.returncode == 2 and "already exists" in r2.stderr
    assert json.loads(data_key.read_text())["key"] == secret  # never overwritten
    r3 = run(home, "keys", "status")
    assert r3.returncode == 0 and "data key" in r3.stdout
    created, *lines = entries(home)
    assert created["event"] == audit.KEY_EVENT and created["key_id"] == json.loads(audit_key.read_text())["key_id"]
    assert [(e["command"], e["outcome"]) for e in lines] == [("keys init", "ok"), ("keys init", "error"),
                                                             ("keys status", "ok")]
    assert lines[1]["exit_code"] == 2 and "already exists" in lines[1]["error"]
    # the key's creation and everything after it is signed (the first command line included: it ended after it)
    assert all("mac" in json.loads(x) for x in (home / "audit" / "audit.jsonl").read_text().splitlines())
    r4 = run(home, "audit", "verify")
    assert r4.returncode == 0 and "intact" in r4.stdout and "HMAC signatures checked" in r4.stdout


def test_loose_key_permissions_refused_unless_forced(home):
    run(home, "keys", "init")
    os.chmod(home / "keys" / "data.key", 0o644)
    r = run(home, "keys", "status")
    assert r.returncode == 2 and "can be read by other users" in r.stderr and "chmod 600" in r.stderr
    r = run(home, "keys", "status", "--force")
    assert r.returncode == 0 and "warning" in r.stderr


def test_encrypt_without_key_fails_before_writing(home, tmp_path):
    out = tmp_path / "data"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Patient John Smith was seen on 2024-01-02 for a routine check. " * 20)
    r = run(home, "--encrypt", "prepare", str(docs), "--output", str(out))
    assert r.returncode == 2 and "no data key" in r.stderr and "keys init" in r.stderr
    assert not out.exists() and not any(tmp_path.glob(".data*"))


def test_audit_verify_cli_catches_tampering(home, tmp_path):
    for _ in range(3):
        run(home, "config", "show", "train")
    log = home / "audit" / "audit.jsonl"
    assert run(home, "audit", "verify").returncode == 0
    lines = log.read_bytes().splitlines()
    log.write_bytes(b"\n".join([lines[0], lines[2]]) + b"\n")  # delete line 2
    r = run(home, "audit", "verify")
    assert r.returncode == 1 and "BROKEN at line 2" in r.stderr
    r = run(home, "audit", "show", "--command", "config", "--json")
    assert r.returncode == 0 and len(r.stdout.splitlines()) >= 2


def test_command_line_records_masked_args_and_artifact_hashes(home, tmp_path):
    from homeforge import artifacts

    with artifacts.write_artifact(tmp_path / "art", stage="test", config={}) as art:
        (art.dir / "x.txt").write_text("x")
    content = artifacts.read_manifest(tmp_path / "art")["content_hash"]
    r = run(home, "verify", str(tmp_path / "art"), "serve.auth.token=supersecret")
    assert r.returncode == 2  # an extra argument: refused by the parser, and still audited (masked)
    r = run(home, "verify", str(tmp_path / "art"))
    assert r.returncode == 0, r.stdout + r.stderr
    last = entries(home)[-1]
    assert last["command"] == "verify" and last["outcome"] == "ok"
    assert last["inputs"] == {str(tmp_path / "art"): content} and last["outputs"] == {}
    first = entries(home)[0]
    assert "supersecret" not in json.dumps(first) and "serve.auth.token=***" in first["args"]


def test_corrupted_audit_log(home):
    run(home, "config", "show", "train")
    log = home / "audit" / "audit.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"seq": 2, "prev": "garbage"\n')  # a cut-off line
    r = run(home, "config", "show", "train")
    assert r.returncode == 0 and "audit log could not be written" in r.stderr and "corrupted" in r.stderr
    r = run(home, "config", "show", "train", env={"HOMEFORGE_AUDIT_REQUIRED": "1"})
    assert r.returncode == 2 and "corrupted line" in r.stderr and r.stdout == ""  # refused before running
    r = run(home, "audit", "verify")
    assert r.returncode == 1 and "BROKEN at line 2" in r.stderr
    r = run(home, "audit", "show")
    assert r.returncode == 2 and "line 2 of the audit log is corrupted" in r.stderr and "Traceback" not in r.stderr

"""An audit log that proves something (issue 11): rewrites without the key, tail deletion with .head, the
`keys init` race, a loose audit key, and secrets masked by value (each pattern of the issue)."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from integrity_helpers import keys_init, run_cli, tiny_model_artifact  # noqa: E402

from homeforge.security import audit, audit_command  # noqa: E402


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def signed_log(home: Path, n: int = 5) -> Path:
    keys_init(home)
    log = audit.AuditLog(fsync=False)
    for i in range(n):
        log.append({"event": "command", "command": f"cmd{i}", "outcome": "ok"})
    return audit.default_path()


def test_key_creation_is_a_signed_event(home):
    audit.AuditLog(fsync=False).append({"event": "command", "command": "before-the-key"})
    path = signed_log(home, n=2)
    entries = list(audit.read_entries(path))
    assert [e.get("event") for e in entries] == ["command", audit.KEY_EVENT, "command", "command"]
    assert "mac" not in entries[0] and all("mac" in e for e in entries[1:])
    res = audit.verify(path)
    assert res.ok and res.macs_checked, res.summary()


def test_stripping_every_mac_and_recomputing_the_chain_is_detected(home):
    """The issue's rewrite: strip every `mac`, recompute the chain and `.head`; the key exists."""
    path = signed_log(home)
    prev, out = audit.GENESIS, []
    for raw in lines(path):
        e = json.loads(raw)
        e.pop("mac")
        e["prev"] = prev
        if e.get("command") == "cmd2":
            e["outcome"] = "rewritten"
        line = audit._encode(e, None)
        out.append(line)
        prev = audit._line_hash(line)
    path.write_bytes(b"".join(x + b"\n" for x in out))
    head = json.loads(lines(path)[-1])
    Path(str(path) + ".head").write_bytes(audit._encode({"seq": head["seq"], "hash": prev}, None) + b"\n")
    res = audit.verify(path)
    assert not res.ok and "signatures were" in res.reason and "no key" not in res.summary()


def test_stripping_the_macs_after_the_key_event_is_detected(home):
    path = signed_log(home)
    ls = lines(path)
    cut = []
    prev = audit._line_hash(ls[0])
    cut.append(ls[0])
    for raw in ls[1:]:
        e = json.loads(raw)
        e.pop("mac")
        e["prev"] = prev
        line = audit._encode(e, None)
        cut.append(line)
        prev = audit._line_hash(line)
    path.write_bytes(b"".join(x + b"\n" for x in cut))
    res = audit.verify(path)
    assert not res.ok and res.first_bad == 2 and "unsigned line" in res.reason


def test_tail_deleted_together_with_head_is_detected(home):
    """The issue's second rewrite: delete the last lines together with `.head`."""
    path = signed_log(home)
    path.write_bytes(b"".join(x + b"\n" for x in lines(path)[:4]))
    Path(str(path) + ".head").unlink()
    res = audit.verify(path)
    assert not res.ok and "head record" in res.reason and "missing" in res.reason


def test_artifact_anchor_catches_lines_cut_with_an_old_head(home, tiny_tokenizer, tmp_path, capsys):
    path = signed_log(home, n=3)  # lines: key event + 3 commands
    head = Path(str(path) + ".head")
    old_head, old_lines = head.read_bytes(), lines(path)
    audit.AuditLog(fsync=False).append({"event": "command", "command": "train"})
    model = tiny_model_artifact(tmp_path / "model", tiny_tokenizer)  # made after line 5
    assert json.loads((model / "homeforge.json").read_text())["audit"]["seq"] == 5
    # the attacker cuts the log back to 4 lines and restores the head record of that time: chain and head agree
    path.write_bytes(b"".join(x + b"\n" for x in old_lines))
    head.write_bytes(old_head)
    assert audit.verify(path).ok
    problem = audit.check_anchor(json.loads((model / "homeforge.json").read_text())["audit"], str(model))
    assert problem and "lines were deleted from its end" in problem
    code, out, err = run_cli(capsys, "audit", "verify", "--artifacts", tmp_path)
    assert code == 1 and "lines were deleted from its end" in err
    code, out, err = run_cli(capsys, "verify", model)  # the command above wrote a new line 5 after the cut
    assert code == 1 and "audit log line 5 is not the one" in err and "rewritten" in err


def test_writer_started_before_keys_init_signs_its_line(home):
    """The race: a command running while `keys init` happens appended an unsigned line (BROKEN forever)."""
    running = audit.AuditLog(fsync=False)  # a command that started before the key existed
    running.append({"event": "command", "command": "early"})
    keys_init(home)  # another process: creates the key and logs it, under the log's lock
    running.append({"event": "command", "command": "late"})  # the running command's line
    res = audit.verify()
    assert res.ok and res.macs_checked, res.summary()
    assert "mac" in json.loads(lines(audit.default_path())[-1])


def test_keys_init_racing_concurrent_writers(home):
    stop = threading.Event()
    errors = []

    def writer(t):
        log = audit.AuditLog(fsync=False)
        i = 0
        while not stop.is_set() and i < 200:
            try:
                log.append({"event": "request", "t": t, "i": i})
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
            i += 1

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    keys_init(home)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    res = audit.verify()
    assert res.ok and res.macs_checked, res.summary()


def test_loose_audit_key_refuses_the_command(home, capsys):
    keys_init(home)
    os.chmod(home / "keys" / "audit.key", 0o644)
    code, out, err = run_cli(capsys, "config", "show", "train")
    assert code == 2 and "audit key cannot be used" in err and "chmod 600" in err and out == ""
    os.chmod(home / "keys" / "audit.key", 0o600)
    code, out, _ = run_cli(capsys, "config", "show", "train")
    assert code == 0 and audit.verify().ok


# --------------------------------------------------------------------------- masking


def logged_args(tmp_path, monkeypatch, argv, env=None) -> list[str]:
    from homeforge.cli._common import PROMPT_FLAGS, SECRET_FLAGS

    log = tmp_path / "a.jsonl"
    monkeypatch.setenv("HOMEFORGE_AUDIT_LOG", str(log))
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    with audit_command.audited_command(argv, SECRET_FLAGS, PROMPT_FLAGS):
        pass
    entry = list(audit.read_entries(log))[-1]
    assert all(s not in log.read_text() for s in ("Sup3rS3cret", "hunter2pass", "tok-7f3a9b", "pseudo-secret-xyz"))
    return entry["args"]


def test_secrets_masked_by_name_value_and_url(home, tmp_path, monkeypatch):
    args = logged_args(tmp_path, monkeypatch, [
        "serve", "m", "serve.api_keys=Sup3rS3cret", "db.passphrase=hunter2pass",
        "--url", "http://alice:tok-7f3a9b@10.0.0.5:8000/v1", "note=pseudo-secret-xyz",
    ], env={"HOMEFORGE_PII_SECRET": "pseudo-secret-xyz"})
    assert args == ["serve", "m", "serve.api_keys=***", "db.passphrase=***", "--url", "http://***@10.0.0.5:8000/v1",
                    "note=***"]


def test_declared_short_flag_and_key_material_masked(home, tmp_path, monkeypatch):
    data, _ = keys_init(home)
    args = logged_args(tmp_path, monkeypatch, ["chat", "--url", "http://127.0.0.1:8000", "-k", "hfk_Sup3rS3cretXYZ",
                                               "x=" + data.secret.hex()])
    assert args == ["chat", "--url", "http://127.0.0.1:8000", "-k", "***", "x=***"]


def test_prompts_logged_as_hash_and_length_unless_opted_in(home, tmp_path, monkeypatch):
    import hashlib

    prompt = "Patient Zhang San, born 1970-01-01, ID 110101197001011234"
    args = logged_args(tmp_path, monkeypatch, ["generate", "m", "-p", prompt, "--prompt=" + prompt])
    digest = f"<prompt sha256:{hashlib.sha256(prompt.encode()).hexdigest()[:16]} len={len(prompt)}>"
    assert args == ["generate", "m", "-p", digest, "--prompt=" + digest]
    assert "Zhang" not in (tmp_path / "a.jsonl").read_text()
    args = logged_args(tmp_path, monkeypatch, ["generate", "m", "-p", prompt], env={"HOMEFORGE_AUDIT_PROMPTS": "1"})
    assert args == ["generate", "m", "-p", prompt]


def test_error_messages_are_masked_too(home, tmp_path, monkeypatch):
    log = tmp_path / "a.jsonl"
    monkeypatch.setenv("HOMEFORGE_AUDIT_LOG", str(log))
    from homeforge.errors import HomeforgeError

    with pytest.raises(HomeforgeError), audit_command.audited_command(["serve", "serve.api_keys=Sup3rS3cret"]):
        raise HomeforgeError("unknown setting serve.api_keys=Sup3rS3cret")
    assert "Sup3rS3cret" not in log.read_text()

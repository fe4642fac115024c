"""Audit log: chain, HMAC, tamper detection (edit, deletion, insertion, reordering), retention, masking."""

from __future__ import annotations

import datetime as dt
import json
import threading

import pytest

from homeforge.security import audit, audit_command

KEY = b"k" * 32


def make_log(tmp_path, n=6, key=None):
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path, key=key, fsync=False)
    for i in range(n):
        log.append({"event": "command", "command": f"cmd{i}", "outcome": "ok", "inputs": {"data": f"/runs/d{i}"}})
    return path


def lines(path):
    return path.read_bytes().splitlines()


def write_lines(path, ls):
    path.write_bytes(b"".join(x + b"\n" for x in ls))


@pytest.mark.parametrize("key", [None, KEY])
def test_untouched_log_verifies(tmp_path, key):
    path = make_log(tmp_path, key=key)
    res = audit.verify(path, key=key)
    assert res.ok and res.lines == 6, res.summary()
    assert res.macs_checked == (key is not None)
    entries = list(audit.read_entries(path))
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0]["prev"] == audit.GENESIS
    assert entries[1]["prev"] == audit._line_hash(lines(path)[0])
    assert entries[0]["user"] == audit.current_user()


def test_edit_detected_names_next_line(tmp_path):
    path = make_log(tmp_path)
    ls = lines(path)
    ls[2] = ls[2].replace(b'"outcome":"ok"', b'"outcome":"no"')
    write_lines(path, ls)
    res = audit.verify(path, key=None)
    assert not res.ok and res.first_bad == 4 and "chain broken" in res.reason


def test_edit_of_last_line_detected_by_head(tmp_path):
    path = make_log(tmp_path)
    ls = lines(path)
    ls[-1] = ls[-1].replace(b"cmd5", b"cmdX")
    write_lines(path, ls)
    res = audit.verify(path, key=None)
    assert not res.ok and "head record" in res.reason


def test_edit_with_recomputed_chain_caught_by_hmac(tmp_path):
    """An attacker who rewrites the whole chain without the key is caught by the MAC."""
    path = make_log(tmp_path, key=KEY)
    entries = list(audit.read_entries(path))
    entries[1]["outcome"] = "forged"
    prev, out = audit.GENESIS, []
    for e in entries:
        e.pop("mac")
        e["prev"] = prev
        line = audit._encode(e, b"x" * 32)  # wrong key
        out.append(line)
        prev = audit._line_hash(line)
    write_lines(path, out)
    res = audit.verify(path, key=KEY)
    assert not res.ok and res.first_bad == 1 and "HMAC" in res.reason


def test_deletion_detected(tmp_path):
    path = make_log(tmp_path)
    ls = lines(path)
    del ls[3]
    write_lines(path, ls)
    res = audit.verify(path, key=None)
    assert not res.ok and res.first_bad == 4


def test_deletion_at_end_detected(tmp_path):
    path = make_log(tmp_path)
    write_lines(path, lines(path)[:-2])
    res = audit.verify(path, key=None)
    assert not res.ok and "deleted from" in res.reason


def test_deletion_at_start_detected(tmp_path):
    path = make_log(tmp_path)
    write_lines(path, lines(path)[1:])
    res = audit.verify(path, key=None)
    assert not res.ok and res.first_bad == 1


def test_insertion_detected(tmp_path):
    path = make_log(tmp_path)
    ls = lines(path)
    fake = json.loads(ls[2])
    fake["command"] = "inserted"
    ls.insert(3, json.dumps(fake, separators=(",", ":")).encode())
    write_lines(path, ls)
    res = audit.verify(path, key=None)
    assert not res.ok and res.first_bad == 4


def test_reordering_detected(tmp_path):
    path = make_log(tmp_path)
    ls = lines(path)
    ls[2], ls[3] = ls[3], ls[2]
    write_lines(path, ls)
    res = audit.verify(path, key=None)
    assert not res.ok and res.first_bad == 3


def test_garbage_line_detected(tmp_path):
    path = make_log(tmp_path)
    with open(path, "ab") as f:
        f.write(b"{not json\n")
    res = audit.verify(path, key=None)
    assert not res.ok and res.first_bad == 7 and "JSON" in res.reason


def test_concurrent_appends_keep_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path, key=KEY, fsync=False)

    def worker(t):
        for i in range(25):
            log.append({"event": "request", "thread": t, "i": i})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res = audit.verify(path, key=KEY)
    assert res.ok and res.lines == 100, res.summary()


def test_show_filters(tmp_path):
    path = make_log(tmp_path)
    audit.AuditLog(path, key=None, fsync=False).append({"event": "request", "user": "alice", "command": "serve"})
    assert [e["command"] for e in audit.show(path, command="cmd3")] == ["cmd3"]
    assert len(audit.show(path, user="alice")) == 1
    assert [e["command"] for e in audit.show(path, artifact="/runs/d2")] == ["cmd2"]
    assert audit.show(path, since="2000-01-01T00:00:00Z", until="2001-01-01T00:00:00Z") == []
    assert len(audit.show(path, since="2000-01-01")) == 7


def test_prune_keeps_chain_verifiable(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path, key=KEY, fsync=False)
    old = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    for i in range(5):
        log.append({"event": "command", "command": f"old{i}", "time": (old + dt.timedelta(days=i)).isoformat()})
    for i in range(3):
        log.append({"event": "command", "command": f"new{i}"})
    dropped = audit.prune(path, keep_days=183, key=KEY)
    assert dropped == 5
    entries = list(audit.read_entries(path))
    assert entries[0]["event"] == "retention-checkpoint" and entries[0]["dropped_through_seq"] == 5
    assert [e["command"] for e in entries[1:]] == ["new0", "new1", "new2"]
    assert audit.verify(path, key=KEY).ok
    log.append({"event": "command", "command": "after"})
    assert audit.verify(path, key=KEY).ok
    assert audit.prune(path, keep_days=183, key=KEY) == 0  # nothing old left
    # tampering after pruning is still caught
    ls = lines(path)
    ls[1] = ls[1].replace(b"new0", b"neX0")
    write_lines(path, ls)
    assert not audit.verify(path, key=KEY).ok


def test_prune_everything_then_append(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = audit.AuditLog(path, key=None, fsync=False)
    for i in range(3):
        log.append({"event": "command", "command": f"old{i}", "time": "2020-01-01T00:00:00Z"})
    assert audit.prune(path, keep_days=183, key=None) == 3
    assert audit.verify(path, key=None).ok
    log.append({"event": "command", "command": "later"})
    assert audit.verify(path, key=None).ok


def test_prune_refuses_broken_log(tmp_path):
    path = make_log(tmp_path)
    write_lines(path, lines(path)[1:])
    with pytest.raises(audit.AuditError, match="broken"):
        audit.prune(path, keep_days=1, key=None)


def test_mask_args():
    argv = ["serve", "--api-key", "s3cret", "--token=abc", "serve.auth.token=xyz", "--key-file", "/k",
            "train.optim.lr=3e-4", "--password", "pw", "--output", "out", "--max-new-tokens", "5", "--hf_token", "t"]
    masked = audit.mask_args(argv)
    assert masked == ["serve", "--api-key", "***", "--token=***", "serve.auth.token=***", "--key-file", "/k",
                      "train.optim.lr=3e-4", "--password", "***", "--output", "out", "--max-new-tokens", "5",
                      "--hf_token", "***"]


def test_reserved_field_refused(tmp_path):
    with pytest.raises(audit.AuditError, match="reserved"):
        audit.AuditLog(tmp_path / "a.jsonl", key=None).append({"seq": 3})


def test_bad_retention_env(monkeypatch):
    monkeypatch.setenv("HOMEFORGE_AUDIT_RETENTION_DAYS", "soon")
    with pytest.raises(audit.AuditError, match="whole number"):
        audit.retention_days()


def test_command_names_in_command_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("HOMEFORGE_AUDIT_LOG", str(tmp_path / "a.jsonl"))
    monkeypatch.setenv("HOMEFORGE_HOME", str(tmp_path))
    for argv in (["--encrypt", "keys", "rotate", "x"], ["audit", "show", "--user", "bob"], ["train", "-c", "t.yaml"]):
        with audit_command.audited_command(argv):
            pass
    assert [e["command"] for e in audit.read_entries(tmp_path / "a.jsonl")] == ["keys rotate", "audit show", "train"]


def test_head_one_write_behind_is_not_tampering(tmp_path):
    """A crash after a line was written but before its head record: the log still verifies."""
    path = make_log(tmp_path, n=4)
    head = (tmp_path / "audit.jsonl.head").read_bytes()
    audit.AuditLog(path, key=None, fsync=False).append({"event": "command", "command": "late"})
    (tmp_path / "audit.jsonl.head").write_bytes(head)  # the head write "did not happen"
    assert audit.verify(path, key=None).ok
    write_lines(path, lines(path)[:-3])  # but a head ahead of the log is still caught
    assert not audit.verify(path, key=None).ok

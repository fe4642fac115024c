"""Feedback capture in the real server: exchanges and ratings reach an encrypted, scrubbed, rotating log."""

from __future__ import annotations

import httpx
import openai
import pytest

from homeforge.errors import HomeforgeError

from .conftest import running_server

EMAIL, PHONE = "jane.doe@fastmail.com", "+44 20 7946 0958"


def _cfg(model_dir, tmp_path, **feedback):
    from homeforge.config import ServeConfig

    return ServeConfig(model_dir=str(model_dir), model_name="tiny", keys_file=str(tmp_path / "keys.json"),
                       max_batch_size=4, feedback={"enabled": True, "dir": str(tmp_path / "fb"), **feedback})


def test_exchange_and_rating_encrypted_and_scrubbed(tiny_model_dir, tmp_path, keyed_home):
    from homeforge.continual.feedback import export_records, joined, log_files, read_records

    with running_server(_cfg(tiny_model_dir, tmp_path)) as (base, state):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        chat = client.chat.completions.create(model="tiny", max_tokens=5, temperature=0,
                                              messages=[{"role": "user", "content": f"mail {EMAIL} or call {PHONE}"}])
        text = client.completions.create(model="tiny", prompt="Return the number of", max_tokens=4, temperature=0)
        r = httpx.post(base + "/v1/feedback", json={"id": chat.id, "rating": 5, "correction": f"write to {EMAIL}"})
        assert r.status_code == 200 and r.json()["id"] == chat.id
        assert httpx.post(base + "/v1/feedback", json={"id": text.id, "rating": 1}).status_code == 200
        bad = httpx.post(base + "/v1/feedback", json={"id": "chatcmpl-nope", "rating": 1})
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "unknown_response"
        assert httpx.post(base + "/v1/feedback", json={"id": chat.id}).status_code == 400
        state.feedback.flush()
    files = log_files(tmp_path / "fb")
    raw = b"".join(f.read_bytes() for f in files)
    assert files and EMAIL.encode() not in raw and b"Return the number" not in raw and b'"type"' not in raw
    recs = list(read_records(tmp_path / "fb"))
    assert [r["type"] for r in recs].count("exchange") == 2 and [r["type"] for r in recs].count("feedback") == 2
    ex = {r["id"]: r for r in joined(tmp_path / "fb")}
    assert ex[chat.id]["rating"] == 5 and "<EMAIL>" in ex[chat.id]["correction"]
    assert EMAIL not in str(ex) and "<EMAIL>" in ex[chat.id]["messages"][0]["content"]
    assert ex[chat.id]["response"] == chat.choices[0].message.content
    assert ex[text.id]["prompt"] == "Return the number of" and ex[text.id]["latency_ms"] > 0
    out, n = export_records(tmp_path / "fb", tmp_path / "x.jsonl", min_rating=3)
    assert n == 1 and "<EMAIL>" in out.read_text()  # only the corrected exchange is rated >= 3

    # a tampered record fails to read; so does a log read with another key
    f = files[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(HomeforgeError):
        list(read_records(f))


def test_unreadable_without_the_key(tiny_model_dir, tmp_path, keyed_home, monkeypatch):
    from homeforge.continual.feedback import FeedbackLog, read_records
    from homeforge.security import keys

    log = FeedbackLog(tmp_path / "fb")
    log.append({"type": "exchange", "id": "a", "prompt": "secret plans"})
    log.close()
    assert log.errors == 0
    monkeypatch.setenv("HOMEFORGE_HOME", str(tmp_path / "other"))
    keys.init_key()
    with pytest.raises(HomeforgeError):
        list(read_records(tmp_path / "fb"))


def test_rotation_and_retention_are_audited(tmp_path, keyed_home):
    import json

    from homeforge import paths
    from homeforge.continual.feedback import FeedbackLog, log_files

    log = FeedbackLog(tmp_path / "fb", max_mb=0.002, max_files=3)  # ~2 KB per file
    for i in range(60):
        log.append({"type": "exchange", "id": f"r{i}", "prompt": "x" * 100, "response": "y" * 100})
    log.flush()
    files = log_files(tmp_path / "fb")
    assert 1 < len(files) <= 3 and log.errors == 0
    assert all(f.stat().st_size <= 2200 for f in files[:-1])
    gone = log.prune(now=10**11)  # far in the future: everything is past its retention
    log.close()
    assert len(gone) == len(files) and not log_files(tmp_path / "fb")
    audit = paths.audit_log().read_text()
    assert audit.count('"feedback-prune"') >= 2 and json.dumps(files[0].name) in audit


def test_off_by_default_and_no_key(tiny_model_dir, tmp_path, monkeypatch):
    from homeforge.config import ServeConfig
    from homeforge.continual.feedback import FeedbackLog

    cfg = ServeConfig(model_dir=str(tiny_model_dir), model_name="tiny", keys_file=str(tmp_path / "keys.json"))
    with running_server(cfg) as (base, state):
        r = httpx.post(base + "/v1/feedback", json={"id": "x", "rating": 1})
        assert r.status_code == 404 and r.json()["error"]["code"] == "feedback_disabled"
        assert state.feedback is None
    monkeypatch.setenv("HOMEFORGE_HOME", str(tmp_path / "empty"))
    for var in ("HOMEFORGE_KEY", "HOMEFORGE_KEY_FILE", "HOMEFORGE_KEY_COMMAND"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(HomeforgeError, match="no data key"):
        FeedbackLog(tmp_path / "fb")

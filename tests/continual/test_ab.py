"""Live A/B in the real server: the split, arm tags on responses, audit and feedback; `ab report` significance."""

from __future__ import annotations

import json
import time

import httpx
import pytest

PROMPTS = [f"{a} {b}" for a in ("Return the", "This module", "Raise ValueError") for b in ("number of", "value",
                                                                                         "list", "name")]


@pytest.fixture(scope="module")
def candidate_dir(tiny_tokenizer, tmp_path_factory):
    """Another debug-preset model (another seed): it answers differently from the champion."""
    from homeforge.models.io import save_model_dir
    from homeforge.models.presets import build_model, preset_config

    tok = tiny_tokenizer
    cfg = preset_config("debug", len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, overrides={"initializer_range": 0.3})
    out = tmp_path_factory.mktemp("cand") / "candidate"
    save_model_dir(build_model(cfg, seed=7), tok, out)
    return out


def test_split_tags_audit_feedback_and_report(tiny_model_dir, candidate_dir, tmp_path, keyed_home):
    from homeforge.config import ServeConfig
    from homeforge.continual.ab import report
    from homeforge.continual.feedback import joined
    from homeforge.serve.audit import RequestAudit

    from .conftest import running_server

    cfg = ServeConfig(model_dir=str(tiny_model_dir), model_name="tiny", keys_file=str(tmp_path / "keys.json"),
                      max_batch_size=4, feedback={"enabled": True, "dir": str(tmp_path / "fb")},
                      ab={"candidate": str(candidate_dir), "percent": 50, "seed": 1})
    audit = RequestAudit(tmp_path / "serve.jsonl")
    texts: dict[tuple[str, str], set] = {}
    with running_server(cfg, audit=audit) as (base, state):
        while not state.driver.cand_state.ready:
            time.sleep(0.05)
        for _ in range(4):
            for prompt in PROMPTS:
                r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4,
                                                               "temperature": 0}, timeout=60).json()
                texts.setdefault((prompt, r["arm"]), set()).add(r["choices"][0]["text"])
                rating = 5 if r["arm"] == "candidate" else 3  # users like the candidate better
                assert httpx.post(base + "/v1/feedback", json={"id": r["id"], "rating": rating}).json()["arm"] == r["arm"]
        sticky = {httpx.post(base + "/v1/chat/completions", timeout=60,
                             json={"model": "tiny", "max_tokens": 2, "user": "alice",
                                   "messages": [{"role": "user", "content": "hi"}]}).json()["arm"] for _ in range(6)}
        state.feedback.flush()
        audit.flush()
    both = [p for p in PROMPTS if (p, "champion") in texts and (p, "candidate") in texts]
    assert sum(texts[(p, "champion")].isdisjoint(texts[(p, "candidate")]) for p in both) >= len(both) - 1  # two models
    counts = {arm: sum(1 for k in texts if k[1] == arm) for arm in ("champion", "candidate")}
    assert counts["champion"] and counts["candidate"]
    assert len(sticky) == 2 or len(sticky) == 1  # a fresh draw per request (by=request)
    arms = [json.loads(line).get("arm") for line in (tmp_path / "serve.jsonl").read_text().splitlines()
            if '"/v1/completions"' in line]
    assert arms.count("candidate") + arms.count("champion") == 48 and 10 < arms.count("candidate") < 38
    ex = joined(tmp_path / "fb")
    assert sum(1 for e in ex if e.get("arm") == "candidate" and e.get("rating") == 5) == arms.count("candidate")
    res = report(tmp_path / "fb", paired="yes")
    assert res["test"] == "paired bootstrap" and res["pairs"] == len(both) and res["candidate_better"] and res["p_value"] < 0.01
    lat = report(tmp_path / "fb", metric="completion_tokens", paired="no")
    assert lat["test"].startswith("permutation") and not lat["candidate_better"]


def test_split_by_key_is_sticky_and_shares_match():
    import random

    from homeforge.serve.ab import arm_for

    rng = random.Random(0)
    users = [f"user{i}" for i in range(2000)]
    first = [arm_for(u, 20, "key", 3, rng) for u in users]
    assert first == [arm_for(u, 20, "key", 3, rng) for u in users]  # one user, one arm
    assert 0.17 < first.count("candidate") / len(users) < 0.23
    draws = [arm_for(None, 20, "request", 0, rng) for _ in range(2000)]
    assert 0.17 < draws.count("candidate") / 2000 < 0.23
    assert all(arm_for(u, 0, "key", 3, rng) == "champion" for u in users[:50])


def test_unpaired_no_difference_is_not_significant(tmp_path):
    import random

    from homeforge.continual.ab import report
    from homeforge.continual.feedback import FeedbackLog

    log = FeedbackLog(tmp_path / "fb", encrypt=False, scrub=False)
    rng = random.Random(0)
    for i in range(80):
        arm = "candidate" if i % 2 else "champion"
        log.append({"type": "exchange", "id": f"r{i}", "arm": arm, "prompt": f"q{i}", "response": "a"})
        log.append({"type": "feedback", "id": f"r{i}", "arm": arm, "rating": rng.randint(1, 5)})
    log.close()
    res = report(tmp_path / "fb")
    assert res["test"].startswith("permutation") and not res["candidate_better"] and res["p_value"] > 0.01
    with pytest.raises(Exception, match="unknown A/B metric"):
        report(tmp_path / "fb", metric="bogus")

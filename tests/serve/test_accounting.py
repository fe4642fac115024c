"""Token accounting at every exit path (finish, client abort, error): limits, metrics, audit; Retry-After."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from homeforge.serve.auth import ApiKey, KeyStore, RateLimiter
from homeforge.serve.lean_engine import SlotEngine

from .conftest import running_server


def _metrics(base: str, token: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    text = httpx.get(base + "/metrics", headers=headers).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fams: dict, family: str, sample: str, **labels) -> float:
    return sum(s.value for s in fams[family].samples if s.name == sample and all(s.labels.get(k) == v
                                                                                  for k, v in labels.items()))


def _settled(state, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while (state.open_ledgers or state.engine.batch_size()) and time.time() < deadline:
        time.sleep(0.02)
    assert not state.open_ledgers and state.engine.batch_size() == 0


def _abort_after(base, token, chunks: int, max_tokens: int) -> int:
    """Stream a completion, hang up after ``chunks`` text chunks (or at its finish); text chunks seen."""
    seen = 0
    body = {"prompt": "def", "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(timeout=30) as h, h.stream("POST", base + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            r.read()
            raise httpx.HTTPStatusError(r.text, request=r.request, response=r)
        for line in r.iter_lines():
            choices = json.loads(line[6:])["choices"] if line.startswith("data: {") else []
            if choices and choices[0]["finish_reason"]:
                break
            if choices and choices[0]["text"]:
                seen += 1
                if seen == chunks:
                    break
    return seen


def test_streams_closed_before_their_last_chunk_are_charged(serve_cfg, tmp_path):
    """The bypass of issue 13: every stream closed just before its end used to cost nothing."""
    from homeforge.serve.audit import RequestAudit

    store = KeyStore.open(serve_cfg.keys_file)
    token = store.add("tpm", "user", tokens_per_minute=300)[1]
    watcher = store.add("ops", "metrics")[1]
    audit = RequestAudit(tmp_path / "audit.jsonl")
    with running_server(serve_cfg, keys=store, audit=audit) as (base, state):
        n_prompt = len(state.tok("def")["input_ids"])
        seen, refused = [], None
        for _ in range(12):
            try:
                seen.append(_abort_after(base, token, chunks=30, max_tokens=40))
            except httpx.HTTPStatusError as exc:
                refused = exc.response
                break
            _settled(state)
        assert refused is not None and refused.status_code == 429, seen
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        # charged the tokens really used: prompt + what was generated before the engine saw the hang-up
        spent = sum(n for _, n in state.limiter._tokens[store.verify(token).id])
        assert sum(n_prompt + n for n in seen) <= spent <= len(seen) * (n_prompt + 40)
        assert spent + n_prompt + 40 > 300  # refused because the next one would not fit, not earlier
        fams = _metrics(base, watcher)
        assert _value(fams, "homeforge_completion_tokens", "homeforge_completion_tokens_total") == spent - n_prompt * len(seen)
        assert _value(fams, "homeforge_time_to_first_token_seconds", "homeforge_time_to_first_token_seconds_count",
                      route="/v1/completions") == len(seen)
        for family in ("homeforge_request_latency_seconds", "homeforge_time_to_first_token_seconds"):
            assert _value(fams, family, family + "_bucket", le="600.0") >= 1  # buckets reach 10 minutes
    audit.close()
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    aborted = [x for x in lines if x.get("route") == "/v1/completions" and x["status"] == 200]
    assert len(aborted) == len(seen)
    for x, n in zip(aborted, seen, strict=True):
        assert x["prompt_tokens"] == n_prompt and n <= x["completion_tokens"] <= 40
        assert x["finish_reasons"] in (["cancelled"], ["length"])  # the engine may have finished meanwhile
    assert [x["status"] for x in lines if x.get("route") == "/v1/completions"][-1] == 429


def test_generation_errors_are_charged_and_audited(serve_cfg, tmp_path):
    from homeforge.serve.audit import RequestAudit

    store = KeyStore.open(serve_cfg.keys_file)
    token = store.add("tpm", "user", tokens_per_minute=10_000)[1]
    audit = RequestAudit(tmp_path / "audit.jsonl")
    with running_server(serve_cfg, keys=store, audit=audit) as (base, state):
        calls = [0]

        def failing(fn):  # the real model until its 6th forward pass (prefill + 4 decode steps), then a crash
            def forward(*a, **kw):
                calls[0] += 1
                if calls[0] > 5:
                    raise RuntimeError("device lost")
                return fn(*a, **kw)
            return forward

        eng = state.engine
        if isinstance(eng, SlotEngine):  # the lean engine runs the model itself: fail its passes
            lm = eng.lm
            lm.prefill, lm.prefill_rows, lm.decode = failing(lm.prefill), failing(lm.prefill_rows), failing(lm.decode)
        else:
            real = eng.backend

            class Failing:
                forward = staticmethod(failing(real.forward))

                def __getattr__(self, name):
                    return getattr(real, name)

            eng.backend = Failing()
        r = httpx.post(base + "/v1/completions", json={"prompt": "def", "max_tokens": 50, "ignore_eos": True},
                       headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        _settled(state)
        if isinstance(eng, SlotEngine):
            del lm.prefill, lm.prefill_rows, lm.decode
        else:
            eng.backend = real
        spent = sum(n for _, n in state.limiter._tokens[store.verify(token).id])
        assert spent == len(state.tok("def")["input_ids"]) + 5  # prompt + the 5 tokens made before the crash
        assert not state.limiter._inflight[store.verify(token).id]  # the reservation was settled
    audit.close()
    line = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()
            if '"/v1/completions"' in x][-1]
    assert line["status"] == 500 and line["completion_tokens"] == 5 and line["finish_reasons"] == ["error"]


def test_aborted_generations_leave_the_batch_gauge_and_the_audit_log_right(serve_cfg, tmp_path):
    from homeforge.serve.audit import RequestAudit

    audit = RequestAudit(tmp_path / "audit.jsonl")
    with running_server(serve_cfg, audit=audit) as (base, state):
        seen = [_abort_after(base, None, chunks=2, max_tokens=200) for _ in range(3)]
        _settled(state)
        fams = _metrics(base)
        assert _value(fams, "homeforge_running_batch_size", "homeforge_running_batch_size") == 0
        assert _value(fams, "homeforge_queue_depth", "homeforge_queue_depth") == 0
        done = _value(fams, "homeforge_completion_tokens", "homeforge_completion_tokens_total")
    audit.close()
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()
             if '"/v1/completions"' in x]
    assert [x["finish_reasons"] for x in lines] == [["cancelled"]] * 3
    assert all(n <= x["completion_tokens"] < 200 and x["prompt_tokens"] for x, n in zip(lines, seen, strict=True))
    assert done == sum(x["completion_tokens"] for x in lines)


def _key(**limits) -> ApiKey:
    return ApiKey("k1", "n", "user", "h", "t", **limits)


def test_retry_after_is_when_enough_budget_frees():
    rl = RateLimiter()
    k = _key(tokens_per_minute=100)
    rl.add_tokens("k1", 5, now=0)
    rl.add_tokens("k1", 100, now=30)
    assert "100 tokens per minute" in rl.check(k, now=40)
    # the oldest event (5 tokens, gone at t=60) does not free enough: the 100 tokens of t=30 must go (t=90)
    assert rl.retry_after(k, now=40) == 50
    assert rl.check(k, now=61) is not None and rl.check(k, now=90.5) is None


def test_token_reservations_and_retry_after_for_a_request():
    rl = RateLimiter()
    k = _key(tokens_per_minute=100)
    rl.add_tokens("k1", 60, now=0)
    ticket, why = rl.reserve(k, 50, now=10)
    assert ticket is None and "up to 50 tokens" in why
    assert rl.retry_after(k, 50, now=10) == 50  # the 60 tokens of t=0 leave at t=60
    ticket, why = rl.reserve(k, 40, now=10)
    assert why is None
    assert rl.check(k, now=11) is not None  # 60 used + 40 reserved in flight: no room for another request
    rl.settle("k1", ticket, 10, now=12)  # it used 10 tokens in the end
    assert rl.check(k, now=13) is None
    # reserved tokens alone block: nothing in the window will free them, so one whole window
    rl2 = RateLimiter()
    assert rl2.reserve(k, 100, now=0)[1] is None
    assert rl2.retry_after(k, 1, now=1) == 60


def test_retry_after_for_the_request_limit():
    rl = RateLimiter()
    k = _key(requests_per_minute=2)
    assert rl.check(k, now=0) is None and rl.check(k, now=10) is None
    assert "2 requests per minute" in rl.check(k, now=20)
    assert rl.retry_after(k, now=20) == 40  # the request of t=0 leaves at t=60


@pytest.mark.parametrize("limit", [30])
def test_a_request_larger_than_the_whole_budget_is_a_400(serve_cfg, limit):
    store = KeyStore.open(serve_cfg.keys_file)
    token = store.add("small", "user", tokens_per_minute=limit)[1]
    with running_server(serve_cfg, keys=store) as (base, _):
        r = httpx.post(base + "/v1/completions", json={"prompt": "def", "max_tokens": 100},
                       headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"
        r = httpx.post(base + "/v1/completions", json={"prompt": "def", "max_tokens": 5},
                       headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200


def test_ledger_completes_once_at_any_exit():
    from homeforge.serve.driver import Ledger

    done = []
    led = Ledger(choices=2, prompt_tokens=6, keep_text=True)
    led.when_done(lambda x: done.append(x.total_tokens))
    led.token(0, "a")
    led.token(0, "b")
    led.finish(0, "length", 2)
    assert not led.done and done == []
    led.token(1, "c")
    led.close()  # the producer never reported choice 1 (a dead engine, a server stopping): what it sent counts
    led.finish(1, "stop", 99)  # too late: ignored
    assert done == [6 + 2 + 1] and led.reasons == ["length", "cancelled"] and led.texts == ["ab", "c"]
    led.when_done(lambda x: done.append("late"))  # registered after completion: runs at once
    assert done[-1] == "late" and len(led.ttft) == 2
    stop_first = Ledger(choices=1, prompt_tokens=3)
    stop_first.finish(0, "stop", 0)  # the first token was a stop token: it still had a first token
    assert len(stop_first.ttft) == 1 and stop_first.audit_fields() == {
        "prompt_tokens": 3, "completion_tokens": 0, "finish_reasons": ["stop"]}

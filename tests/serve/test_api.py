"""The real server on loopback, called with the official `openai` client and httpx."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from .conftest import running_server

PROMPTS = ["Return the number of", "This module provides", "Raise ValueError if the argument is not a",
           "x", "The quick brown fox jumps over the lazy dog and", "def", "import", "Class for"]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    from homeforge.config import ServeConfig

    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    cfg = ServeConfig(model_dir=str(tiny_model_dir), model_name="tiny", keys_file=str(keys), max_batch_size=8,
                      max_queue=64)
    with running_server(cfg) as (base, state):
        yield base, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_health_ready(server, client):
    base, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert httpx.get(base + "/ready").json()["status"] == "ready"


def test_completion_equals_direct_greedy(server, client, tiny_model_dir):
    from homeforge.models.io import load_causal_lm

    model, tok = load_causal_lm(tiny_model_dir)
    ids = torch.tensor([tok.encode("Return the number of")])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         eos_token_id=None, pad_token_id=tok.pad_token_id, min_new_tokens=12)
    r = client.completions.create(model="tiny", prompt="Return the number of", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ids.shape[1], 12)


def test_streaming_completion_matches_non_streaming(client):
    kw = dict(model="tiny", prompt="This module provides", max_tokens=10, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_uses_template_streaming_and_not(client, tiny_model_dir):
    from homeforge.models.io import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a module?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    n_prompt = len(tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"])
    assert r.usage.prompt_tokens == n_prompt and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_legacy_logprobs_for_lm_eval(server, tiny_model_dir):
    """The request lm-evaluation-harness `local-completions` sends to score a continuation."""
    from homeforge.models.io import load_causal_lm

    model, tok = load_causal_lm(tiny_model_dir)
    ids = tok.encode("Raise ValueError if the argument is not a number")
    body = {"model": "tiny", "prompt": [ids, ids[:5]], "echo": True, "logprobs": 1, "max_tokens": 1,
            "temperature": 0, "seed": 1234}
    out = httpx.post(server[0] + "/v1/completions", json=body, timeout=60).json()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    ch = out["choices"][0]["logprobs"]
    assert len(ch["tokens"]) == len(ids) + 1 and ch["token_logprobs"][0] is None
    assert ch["token_logprobs"][1:len(ids)] == pytest.approx([float(lp[i - 1, ids[i]]) for i in range(1, len(ids))],
                                                           abs=1e-4)
    greedy_next = int(lp[-1].argmax())
    assert ch["token_logprobs"][-1] == pytest.approx(float(lp[-1].max()), abs=1e-4)
    assert list(ch["top_logprobs"][-1].values())[0] == pytest.approx(float(lp[-1].max()), abs=1e-4)
    assert ch["tokens"][-1] == tok.decode([greedy_next])
    text = out["choices"][0]["text"]
    assert all(text[o:].startswith(t) for o, t in zip(ch["text_offset"], ch["tokens"], strict=True))
    assert len(out["choices"][1]["logprobs"]["tokens"]) == 6
    # max_tokens 0: the prompt scored, nothing generated
    zero = httpx.post(server[0] + "/v1/completions", json={**body, "max_tokens": 0}, timeout=60).json()
    assert zero["choices"][0]["logprobs"]["token_logprobs"] == ch["token_logprobs"][:-1]
    assert zero["usage"]["completion_tokens"] == 0


def test_concurrent_requests_get_their_own_greedy_outputs(server, client):
    _, state = server
    kw = dict(model="tiny", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS]
    seen_before = state.engine.max_batch_seen
    with cf.ThreadPoolExecutor(len(PROMPTS) * 2) as ex:
        futs = [ex.submit(lambda p: client.completions.create(prompt=p, **kw).choices[0].text, p)
                for p in PROMPTS * 2]
        together = [f.result() for f in futs]
    assert together == alone * 2
    assert state.engine.max_batch_seen > 1 or seen_before > 1  # they really were batched
    assert len(set(alone)) == len(PROMPTS)


def test_n_choices_and_seed(client):
    r = client.completions.create(model="tiny", prompt="def", max_tokens=8, temperature=1.0, n=3, seed=5)
    again = client.completions.create(model="tiny", prompt="def", max_tokens=8, temperature=1.0, n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    assert len({c.text for c in r.choices}) > 1


def test_disconnecting_client_does_not_stall_others(server, client):
    base, state = server
    # a streaming client that reads two chunks and hangs up while the server still has 250 tokens to go
    with httpx.Client(timeout=30) as h, h.stream("POST", base + "/v1/completions", json={
            "model": "tiny", "prompt": "x", "max_tokens": 250, "temperature": 0, "stream": True,
            "ignore_eos": True}) as r:
        lines = r.iter_lines()
        next(lines), next(lines)
    t0 = time.time()
    out = client.completions.create(model="tiny", prompt="def", max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length" and time.time() - t0 < 20
    deadline = time.time() + 10
    while state.engine.batch_size() and time.time() < deadline:
        time.sleep(0.05)
    assert state.engine.batch_size() == 0  # the abandoned request left the batch


def test_embeddings_float_and_base64(server, client, tiny_model_dir):
    r = client.embeddings.create(model="tiny", input=["hello world", "def"])  # the client asks for base64
    v = np.array(r.data[0].embedding)
    assert len(r.data) == 2 and v.shape == (64,) and abs(np.linalg.norm(v) - 1) < 1e-5
    f = httpx.post(server[0] + "/v1/embeddings", json={"input": "hello world", "encoding_format": "float"}).json()
    assert np.allclose(f["data"][0]["embedding"], v, atol=1e-6)
    b = httpx.post(server[0] + "/v1/embeddings", json={"input": "def", "encoding_format": "base64"}).json()
    assert np.allclose(np.frombuffer(base64.b64decode(b["data"][0]["embedding"]), "<f4"), r.data[1].embedding)


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": "many"}, 400, "n"),
    ({"prompt": 12}, 400, "prompt"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": [[1, 2, 999999]]}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "word " * 400}, 413, "prompt"),
    ({"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
])
def test_bad_input_gets_openai_errors(server, body, status, param):
    base, _ = server
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(base + "/v1/completions", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param


def test_bad_chat_and_unknown_route(server):
    base, _ = server
    r = httpx.post(base + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400
    r = httpx.get(base + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(base + "/v1/classifications", json={"input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_model"


def test_flood_is_answered_or_refused_never_500(tiny_model_dir, tmp_path):
    """A queue of 4 and a flood of 24 requests: each gets 200 or 429, every accepted one its text."""
    from homeforge.config import ServeConfig

    cfg = ServeConfig(model_dir=str(tiny_model_dir), keys_file=str(tmp_path / "k.json"), max_batch_size=2,
                      max_queue=4)
    with running_server(cfg) as (base, _):
        def call(i):
            return httpx.post(base + "/v1/completions", json={"prompt": "def", "max_tokens": 20, "temperature": 0,
                                                              "ignore_eos": True}, timeout=60)
        with cf.ThreadPoolExecutor(24) as ex:
            rs = list(ex.map(call, range(24)))
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
        texts = {r.json()["choices"][0]["text"] for r in rs if r.status_code == 200}
        assert len(texts) == 1  # same prompt, greedy: the same answer for every accepted request
        assert all(r.json()["error"]["code"] == "queue_full" for r in rs if r.status_code == 429)
        assert httpx.get(base + "/health").status_code == 200


def test_metrics_parse_with_prometheus_parser(server, client):
    client.completions.create(model="tiny", prompt="def", max_tokens=3, temperature=0)
    text = httpx.get(server[0] + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("homeforge_requests", "homeforge_request_latency_seconds", "homeforge_time_to_first_token_seconds",
                 "homeforge_prompt_tokens", "homeforge_completion_tokens", "homeforge_queue_depth",
                 "homeforge_running_batch_size"):
        assert name in fams, name
    ok = [s for s in fams["homeforge_requests"].samples
          if s.name == "homeforge_requests_total" and s.labels == {"route": "/v1/completions", "status": "200",
                                                                    "role": "anonymous"}]
    assert ok and ok[0].value >= 1
    assert any(s.name.endswith("_count") and s.value >= 1 for s in fams["homeforge_time_to_first_token_seconds"].samples)
    assert sum(s.value for s in fams["homeforge_completion_tokens"].samples if s.name.endswith("_total")) >= 3


def test_sse_wire_format(server):
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] <= 3


def test_shutdown_finishes_in_flight_requests(tiny_model_dir, tmp_path):
    from homeforge.config import ServeConfig

    cfg = ServeConfig(model_dir=str(tiny_model_dir), keys_file=str(tmp_path / "k.json"), max_batch_size=2)
    results = []
    with running_server(cfg) as (base, _):
        def call():
            results.append(httpx.post(base + "/v1/completions", json={
                "prompt": "def", "max_tokens": 150, "temperature": 0, "ignore_eos": True}, timeout=60))
        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert all(r.json()["usage"]["completion_tokens"] == 150 for r in results)


def test_classifier_model_endpoint(tiny_classifier_dir, tiny_tokenizer, tmp_path):
    """A sequence-classification model directory gets /v1/classifications; generation is refused."""
    from transformers import LlamaForSequenceClassification

    from homeforge.config import ServeConfig

    tok = tiny_tokenizer
    model = LlamaForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    texts = ["my card was charged twice", "hello"]
    with torch.no_grad():
        want = [torch.softmax(model(**tok(t, return_tensors="pt")).logits[0], -1) for t in texts]
    scfg = ServeConfig(model_dir=str(tiny_classifier_dir), keys_file=str(tmp_path / "k.json"))
    with running_server(scfg) as (base, state):
        assert state.kind == "classifier"
        r = httpx.post(base + "/v1/classifications", json={"input": texts}).json()
        for got, p in zip(r["data"], want, strict=True):
            k = int(p.argmax())
            assert got["label"] == ["billing", "fraud", "other"][k] and got["score"] == pytest.approx(float(p[k]),
                                                                                                       abs=1e-5)
            assert sum(got["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        r = httpx.post(base + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_model"


def test_edge_values_are_accepted_or_refused_cleanly(server):
    base, _ = server
    ok = [{"prompt": "x", "seed": 2**70, "temperature": 1, "max_tokens": 3},
          {"prompt": "x", "seed": -1, "temperature": 1, "max_tokens": 3},
          {"prompt": "x", "top_k": 10**9, "temperature": 1, "max_tokens": 3},
          {"prompt": [[]], "max_tokens": 2},
          {"prompt": "café 中文 ☃", "max_tokens": 2, "stop": "\n"}]
    for body in ok:
        r = httpx.post(base + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, (body, r.text)
    r = httpx.post(base + "/v1/embeddings", json={"input": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    big = b'{"prompt": "' + b"a" * (33 << 20) + b'"}'
    r = httpx.post(base + "/v1/completions", content=big, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]


def test_non_streaming_client_that_gives_up_frees_its_slot(serve_cfg):
    """A non-streaming client that times out: its request leaves the batch without finishing."""
    cfg = serve_cfg.model_copy(update={"max_batch_size": 1})
    with running_server(cfg) as (base, state):
        real = state.engine.backend

        class Slowed:  # the real model, 20 ms slower per forward, so the request outlives the client
            max_context, vocab_size = real.max_context, real.vocab_size

            def new_cache(self):
                return real.new_cache()

            def forward(self, *a, **kw):
                time.sleep(0.02)
                return real.forward(*a, **kw)

        state.engine.backend = Slowed()
        steps0 = state.engine.steps
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 250, "temperature": 0,
                                                        "ignore_eos": True}, timeout=httpx.Timeout(30, read=0.3))
        deadline = time.time() + 5
        while state.engine.batch_size() and time.time() < deadline:
            time.sleep(0.05)
        assert state.engine.batch_size() == 0
        assert state.engine.steps - steps0 < 200  # it left long before its 250 tokens
        state.engine.backend = real
        r = httpx.post(base + "/v1/completions", json={"prompt": "def", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200

"""gRPC (homeforge.v1.Inference) on a real channel over loopback: the same tokens, keys, roles, limits,
validation and audit as the HTTP API; the shipped stubs match the .proto; the example client runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest
import torch

from homeforge.config import ServeConfig
from homeforge.serve.auth import KeyStore
from homeforge.serve.rpc import inference_pb2 as pb
from homeforge.serve.rpc import inference_pb2_grpc as pb_grpc

from .conftest import running_gateway, running_server
from .test_gateway import gw_cfg, metric, sse

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def srv(tiny_model_dir, tmp_path_factory):
    from homeforge.serve.audit import RequestAudit

    root = tmp_path_factory.mktemp("grpc")
    store = KeyStore.open(root / "keys.json")
    keys = {"user": store.add("app", "user")[1], "metrics": store.add("grafana", "metrics")[1],
            "limited": store.add("limited", "user", requests_per_minute=2)[1]}
    audit = RequestAudit(root / "audit.jsonl")
    cfg = ServeConfig(model_dir=str(tiny_model_dir), keys_file=str(root / "keys.json"), grpc_port=0,
                      max_batch_size=4)
    with running_server(cfg, keys=store, audit=audit) as (base, st):
        channel = grpc.insecure_channel(f"127.0.0.1:{st.grpc_port}")
        yield SimpleNamespace(base=base, st=st, stub=pb_grpc.InferenceStub(channel), keys=keys, store=store,
                              audit=audit, root=root)
        channel.close()
    audit.close()


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def pieces(chunks) -> dict:
    out = {"pieces": [], "finish": [], "usage": None, "logprobs": []}
    for c in chunks:
        if c.text:
            out["pieces"].append(c.text)
        if c.finish_reason:
            out["finish"].append(c.finish_reason)
        if c.HasField("usage"):
            u = c.usage
            out["usage"] = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                            "total_tokens": u.total_tokens}
        out["logprobs"] += [(t.token, round(t.logprob, 5)) for t in c.logprobs]
    return out


def test_shipped_stubs_match_the_proto():
    from homeforge.serve.rpc import stubs

    assert stubs.differences() == [], "run: python -m homeforge.serve.rpc.stubs"


def test_grpc_streaming_equals_http_streaming_token_for_token(srv):
    hdr = {"Authorization": f"Bearer {srv.keys['user']}"}
    body = {"prompt": "def add(a, b):", "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    http = sse(srv.base + "/v1/completions", body, hdr)
    rpc = pieces(srv.stub.Complete(pb.CompletionRequest(prompt="def add(a, b):", max_tokens=24, temperature=0,
                                                        ignore_eos=True, logprobs=2), metadata=auth(srv.keys["user"])))
    assert len(http["pieces"]) >= 10
    assert rpc["pieces"] == http["pieces"] and rpc["finish"] == http["finish"] == ["length"]
    assert rpc["usage"] == http["usage"]
    assert len(rpc["logprobs"]) == 24

    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
            "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    http = sse(srv.base + "/v1/chat/completions", chat, hdr)
    msgs = [pb.Message(role=m["role"], content=m["content"]) for m in chat["messages"]]
    rpc = pieces(srv.stub.Chat(pb.ChatRequest(messages=msgs, max_tokens=20, temperature=0, ignore_eos=True),
                               metadata=auth(srv.keys["user"])))
    assert rpc["pieces"] == http["pieces"] and rpc["usage"] == http["usage"] and rpc["finish"] == ["length"]


def test_keys_and_roles_are_those_of_http(srv):
    req = pb.CompletionRequest(prompt="x", max_tokens=1)
    for meta, code in (([], grpc.StatusCode.UNAUTHENTICATED), (auth("hfk_00000000_wrong"), grpc.StatusCode.UNAUTHENTICATED),
                       (auth(srv.keys["metrics"]), grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.RpcError) as err:
            list(srv.stub.Complete(req, metadata=meta))
        assert err.value.code() == code, meta
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.ListModels(pb.ListModelsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key is required" in err.value.details()
    models = srv.stub.ListModels(pb.ListModelsRequest(), metadata=auth(srv.keys["user"]))
    assert [m.id for m in models.data] == ["tiny-llama"]
    for _ in range(2):
        assert pieces(srv.stub.Complete(req, metadata=auth(srv.keys["limited"])))["usage"]["completion_tokens"] == 1
    with pytest.raises(grpc.RpcError) as err:  # the key's requests-per-minute limit, shared with HTTP
        list(srv.stub.Complete(req, metadata=auth(srv.keys["limited"])))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(err.value.trailing_metadata())["retry-after"]) >= 1
    r = httpx.post(srv.base + "/v1/completions", json={"prompt": "x"},
                   headers={"Authorization": f"Bearer {srv.keys['limited']}"})
    assert r.status_code == 429


@pytest.mark.parametrize("method,request_,field", [
    ("Complete", pb.CompletionRequest(prompt="x", temperature=3.0), "temperature"),
    ("Complete", pb.CompletionRequest(prompt="x", n=0), "n"),
    ("Complete", pb.CompletionRequest(prompt_ids=pb.TokenIds(ids=[])), "prompt"),
    ("Complete", pb.CompletionRequest(prompt="x", max_tokens=100000), "max_tokens"),
    ("Chat", pb.ChatRequest(messages=[pb.Message(role="tool", content="42")]), "messages[0].tool_call_id"),
    ("Chat", pb.ChatRequest(messages=[pb.Message(role="robot", content="hi")]), "messages[0]"),
    ("Chat", pb.ChatRequest(), "messages"),
])
def test_invalid_arguments_name_the_field(srv, method, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        list(getattr(srv.stub, method)(request_, metadata=auth(srv.keys["user"])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field), err.value.details()
    assert dict(err.value.trailing_metadata())["param"].startswith(field.split("[")[0])


def test_unknown_model_is_not_found(srv):
    with pytest.raises(grpc.RpcError) as err:
        list(srv.stub.Complete(pb.CompletionRequest(model="gpt-4", prompt="x"), metadata=auth(srv.keys["user"])))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "tiny-llama" in err.value.details()


def _slow_decode(monkeypatch, seconds: float) -> None:
    """Each decode step takes ``seconds`` longer, so a cancel reaches the server before a tiny model
    (200 tokens in a few ms) has finished: the test is about what happens on cancel."""
    from homeforge.serve.engine import Engine
    from homeforge.serve.lean_engine import SlotEngine

    for cls in (Engine, SlotEngine):
        step = cls.__dict__["_decode_step"]

        def slow(self, _step=step):
            time.sleep(seconds)
            return _step(self)

        monkeypatch.setattr(cls, "_decode_step", slow)


def test_calls_are_audited_and_counted_like_http(srv, monkeypatch):
    out = pieces(srv.stub.Complete(pb.CompletionRequest(prompt="def", max_tokens=5, ignore_eos=True),
                                   metadata=auth(srv.keys["user"])))
    _slow_decode(monkeypatch, 0.01)
    # a client that cancels mid-stream: charged and audited with what it got
    call = srv.stub.Complete(pb.CompletionRequest(prompt="def", max_tokens=200, ignore_eos=True),
                             metadata=auth(srv.keys["user"]))
    got = [next(call), next(call)]
    call.cancel()
    assert all(c.text for c in got)
    deadline = time.time() + 10
    while srv.st.open_ledgers and time.time() < deadline:
        time.sleep(0.02)
    srv.audit.flush()
    lines = [json.loads(x) for x in (srv.root / "audit.jsonl").read_text().splitlines()]
    mine = [x for x in lines if x.get("route") == "/homeforge.v1.Inference/Complete" and x["status"] in (200, 499)]
    done, cancelled = mine[-2], mine[-1]
    assert done["transport"] == "grpc" and done["method"] == "GRPC" and done["status"] == 200
    assert done["key_id"] == srv.store.verify(srv.keys["user"]).id and done["model"] == "tiny-llama"
    assert (done["prompt_tokens"], done["completion_tokens"]) == (out["usage"]["prompt_tokens"], 5)
    assert cancelled["status"] == 499 and cancelled["finish_reasons"] == ["cancelled"]
    assert 2 <= cancelled["completion_tokens"] < 200
    assert metric(srv.base, "homeforge_requests_total", srv.keys["metrics"],
                  route="/homeforge.v1.Inference/Complete", status="200") >= 1


def test_embeddings_over_grpc_equal_http(srv):
    texts = ["the sea", "一个中文句子"]
    rpc = srv.stub.Embed(pb.EmbedRequest(input=texts), metadata=auth(srv.keys["user"]))
    http = httpx.post(srv.base + "/v1/embeddings", json={"input": texts},
                      headers={"Authorization": f"Bearer {srv.keys['user']}"}).json()
    assert rpc.usage.prompt_tokens == http["usage"]["prompt_tokens"] and rpc.model == "tiny-llama"
    for e, h in zip(rpc.data, http["data"], strict=True):
        assert torch.allclose(torch.tensor(list(e.embedding)), torch.tensor(h["embedding"]), atol=1e-6)


def test_classify_over_grpc_against_transformers(tiny_classifier_dir, tiny_tokenizer, tmp_path):
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    texts = ["my card was charged twice", "你好"]
    with torch.no_grad():
        want = [torch.softmax(model(**tiny_tokenizer(t, return_tensors="pt")).logits[0], -1) for t in texts]
    cfg = ServeConfig(model_dir=str(tiny_classifier_dir), keys_file=str(tmp_path / "k.json"), grpc_port=0)
    with running_server(cfg) as (_, st), grpc.insecure_channel(f"127.0.0.1:{st.grpc_port}") as channel:
        r = pb_grpc.InferenceStub(channel).Classify(pb.ClassifyRequest(input=texts))
    for got, p in zip(r.data, want, strict=True):
        k = int(p.argmax())
        assert got.label == ["billing", "fraud", "other"][k] and got.score == pytest.approx(float(p[k]), abs=1e-5)
        assert sum(got.scores.values()) == pytest.approx(1.0, abs=1e-5)


def test_grpc_through_the_gateway(upstreams, tmp_path):
    a = upstreams[0]
    body = {"prompt": "def add(a, b):", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    direct = sse(a.url + "/v1/completions", body)
    with running_gateway(gw_cfg(tmp_path, upstreams, grpc_port=0)) as (_, st), \
            grpc.insecure_channel(f"127.0.0.1:{st.grpc_port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        rpc = pieces(stub.Complete(pb.CompletionRequest(prompt=body["prompt"], max_tokens=16, temperature=0,
                                                        ignore_eos=True)))
    assert rpc["pieces"] == direct["pieces"] and rpc["usage"] == direct["usage"]


def test_the_example_client_runs(srv):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "grpc_client.py"), "--target",
                        f"127.0.0.1:{srv.st.grpc_port}", "--api-key", srv.keys["user"], "--max-tokens", "8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "models: tiny-llama" in r.stdout and "[tokens: prompt" in r.stdout and "embedding: 64 dimensions" in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "grpc_client.py"), "--target",
                        f"127.0.0.1:{srv.st.grpc_port}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr

"""Strict API on a real server: the key before the body, strict types, OpenAI-shaped 400s, /openapi.json."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import httpx
import pytest

from homeforge.serve.auth import KeyStore

from .conftest import running_server


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    from homeforge.config import ServeConfig

    path = tmp_path_factory.mktemp("strict") / "keys.json"
    store = KeyStore.open(path)
    tokens = {role: store.add(role, role)[1] for role in ("user", "metrics")}
    cfg = ServeConfig(model_dir=str(tiny_model_dir), model_name="tiny", keys_file=str(path), max_batch_size=4,
                      max_context=64)
    with running_server(cfg, keys=store) as (base, state):
        yield base, state, tokens


def _post(base, path, body, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(base + path, content=content, headers=headers, timeout=30)


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"prompt": [false]}', b"[1, 2]"])
def test_the_key_is_checked_before_the_body(keyed, body):
    base, _, tokens = keyed
    r = _post(base, "/v1/completions", body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key", r.text
    r = _post(base, "/v1/completions", body, "hfk_deadbeef_wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = _post(base, "/v1/completions", body, tokens["user"])
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_huge_declared_body_without_a_key_is_refused_unread(keyed):
    """The answer comes before a byte of the (announced 1 GB) body is sent."""
    base, _, _ = keyed
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000\r\n\r\n")
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 401"), head


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": [False]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, True]]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": False}, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 1.0}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo"),
    ("/v1/completions", {"prompt": "x", "stream": 1}, "stream"),
    ("/v1/completions", {"prompt": "x", "seed": 1.5}, "seed"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": "no"}}, "stream_options.include_usage"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "tool_call_id": "call_1"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant"}]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2.0},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/embeddings", {"input": [True]}, "input"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "binary"}, "encoding_format"),
])
def test_lenient_values_are_refused_naming_the_field(keyed, path, body, param):
    base, _, tokens = keyed
    r = _post(base, path, body, tokens["user"])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param.split(".")[0].split("[")[0] in err["message"]


def test_non_finite_numbers_and_empty_bodies(keyed):
    base, _, tokens = keyed
    r = _post(base, "/v1/completions", b'{"prompt": "x", "temperature": NaN}', tokens["user"])
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
        r = _post(base, path, b"", tokens["user"])
        err = r.json()["error"]
        assert r.status_code == 400 and err["message"].startswith("the request body is empty"), r.text
    r = _post(base, "/v1/completions", {}, tokens["user"])
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "prompt is required", "type": "invalid_request_error", "param": "prompt", "code": None}


def test_valid_tool_conversation_and_strict_types_still_accepted(keyed):
    """What OpenAI accepts goes through: ints for floats, null for defaults, text parts, tool results and calls."""
    base, _, tokens = keyed
    ok = [("/v1/completions", {"prompt": [1, 2, 3], "temperature": 0, "top_p": 1, "max_tokens": 2}),
          ("/v1/completions", {"prompt": "x", "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
                               "max_tokens": 1, "unknown_field": {"ignored": True}}),
          ("/v1/completions", {"prompt": "x", "max_tokens": 1, "temperature": None, "top_p": None, "n": None,
                               "stream": None, "echo": None, "logprobs": None, "stop": None, "seed": None}),
          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                    "logprobs": None, "top_logprobs": None, "n": None}),
          ("/v1/chat/completions", {"messages": [
              {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
              {"role": "user", "content": "add 2 and 3"},
              {"role": "assistant", "content": None,
               "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
              {"role": "tool", "tool_call_id": "c1", "content": "5"}], "max_tokens": 2, "tool_choice": "none"})]
    for path, body in ok:
        r = _post(base, path, body, tokens["user"])
        assert r.status_code == 200, (body, r.text)


def test_openapi_document_is_behind_the_key_and_matches_the_server(keyed):
    jsonschema = pytest.importorskip("jsonschema")
    base, _, tokens = keyed
    assert httpx.get(base + "/openapi.json").status_code == 401
    doc = httpx.get(base + "/openapi.json", headers={"Authorization": f"Bearer {tokens['metrics']}"}).json()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classifications",
            "/health", "/ready", "/metrics", "/admin/reload"} <= set(doc["paths"])
    assert '"422"' not in json.dumps(doc)  # every refusal is a 400 in the OpenAI shape, as documented
    op = doc["paths"]["/v1/completions"]["post"]
    assert op["security"] == [{"bearerAuth": []}] and {"400", "401", "429"} <= set(op["responses"])
    assert doc["paths"]["/health"]["get"].get("security") is None
    # the request schemas accept and refuse what the server accepts and refuses
    schemas = {"components": doc["components"]}
    cases = [("/v1/completions", "CompletionRequest", {"prompt": "x", "max_tokens": 1}),
             ("/v1/completions", "CompletionRequest", {"prompt": [False]}),
             ("/v1/completions", "CompletionRequest", {"prompt": "x", "echo": "yes"}),
             ("/v1/completions", "CompletionRequest", {"prompt": "x", "temperature": False}),
             ("/v1/completions", "CompletionRequest", {"prompt": "x", "n": 0}),
             ("/v1/completions", "CompletionRequest", {"prompt": "x", "stop": [""]}),
             ("/v1/chat/completions", "ChatRequest", {"messages": [{"role": "tool", "content": "5"}]}),
             ("/v1/chat/completions", "ChatRequest", {"messages": [{"role": "assistant"}]}),
             ("/v1/chat/completions", "ChatRequest", {"messages": [{"role": "tool", "content": "5",
                                                                    "tool_call_id": "c"}], "max_tokens": 1}),
             ("/v1/embeddings", "EmbeddingRequest", {"input": [True]}),
             ("/v1/embeddings", "EmbeddingRequest", {"input": "x"})]
    for path, name, body in cases:
        schema = {**schemas, "$ref": f"#/components/schemas/{name}"}
        valid = jsonschema.Draft202012Validator(schema).is_valid(body)
        status = _post(base, path, body, tokens["user"]).status_code
        assert valid == (status != 400), (body, valid, status)


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(keyed, tmp_path):
    """A bounded property-based run of the published document against the live server: zero 5xx."""
    pytest.importorskip("schemathesis", reason="pip install 'homeforge[fuzz]' for the API fuzz test")
    st_cli = shutil.which("st") or shutil.which("schemathesis")
    cmd = [st_cli] if st_cli else [sys.executable, "-m", "schemathesis.cli"]
    base, _, tokens = keyed
    auth = f"Authorization: Bearer {tokens['user']}"
    spec = tmp_path / "openapi.json"
    spec.write_text(httpx.get(base + "/openapi.json", headers={"Authorization": f"Bearer {tokens['user']}"}).text)
    r = subprocess.run([*cmd, "--no-color", "run", str(spec), "--url", base, "-H", auth,
                        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance", "--max-examples", "25", "--workers", "1", "--seed", "1",
                        "--request-timeout", "60", "--generation-database", "none",
                        "--exclude-path", "/admin/reload"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_an_unreadable_key_file_is_a_json_500_not_a_crash(serve_cfg):
    from pathlib import Path

    store = KeyStore.open(serve_cfg.keys_file)
    token = store.add("app", "user")[1]
    with running_server(serve_cfg, keys=store) as (base, _):
        path = Path(serve_cfg.keys_file)
        good = path.read_text()
        path.write_text("{broken")
        r = _post(base, "/v1/completions", {"prompt": "x", "max_tokens": 1}, token)
        assert r.status_code == 500 and "API key file is not valid" in r.json()["error"]["message"]
        path.write_text(good)
        assert _post(base, "/v1/completions", {"prompt": "x", "max_tokens": 1}, token).status_code == 200

"""API keys (hashed, roles, revocation), rate limits, bind refusal, audit lines, CORS."""

from __future__ import annotations

import json
import stat

import httpx
import openai
import pytest

from homeforge.errors import HomeforgeError
from homeforge.serve.auth import KeyStore, RateLimiter

from .conftest import running_server


def test_keys_are_stored_hashed_and_verified(tmp_path):
    store = KeyStore.open(tmp_path / "keys.json")
    key, token = store.add("app", "user", requests_per_minute=5)
    raw = (tmp_path / "keys.json").read_text()
    assert token not in raw and token.split("_")[-1] not in raw and key.sha256 in raw
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    again = KeyStore.open(tmp_path / "keys.json")
    assert again.verify(token).id == key.id
    assert again.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert again.verify("hfk_nokey_x") is None and again.verify("sk-whatever") is None
    with pytest.raises(HomeforgeError, match="already exists"):
        again.add("app", "user")
    with pytest.raises(HomeforgeError, match="unknown role"):
        again.add("x", "root")
    again.revoke("app")
    assert again.verify(token) is None and not again.active()


def test_rate_limiter_windows():
    from homeforge.serve.auth import ApiKey

    k = ApiKey("k1", "n", "user", "h", "t", requests_per_minute=2, tokens_per_minute=100)
    rl = RateLimiter()
    assert rl.check(k, now=0) is None and rl.check(k, now=1) is None
    assert "2 requests per minute" in rl.check(k, now=2)
    assert rl.check(k, now=61) is None  # the first request left the window
    rl.add_tokens("k1", 150, now=61)
    assert "100 tokens per minute" in rl.check(k, now=62)


@pytest.fixture
def keyed(serve_cfg, tmp_path):
    store = KeyStore.open(serve_cfg.keys_file)
    tokens = {role: store.add(role, role)[1] for role in ("admin", "user", "metrics", "operator", "viewer")}
    tokens["limited"] = store.add("limited", "user", requests_per_minute=3)[1]
    return serve_cfg, store, tokens


def test_roles_and_missing_or_wrong_keys(keyed, tmp_path):
    cfg, store, tokens = keyed
    from homeforge.serve.audit import RequestAudit

    audit = RequestAudit(tmp_path / "audit.jsonl")
    with running_server(cfg, keys=store, audit=audit) as (base, _):
        body = {"prompt": "def", "max_tokens": 2}

        def post(token=None, path="/v1/completions", json_body=body):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return httpx.post(base + path, json=json_body, headers=headers, timeout=30)

        r = post()
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = post("hfk_deadbeef_nope")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert post(tokens["metrics"]).status_code == 403
        assert post(tokens["user"], json_body={"prompt": 1}).status_code == 400  # known key: now the body counts
        assert post(None, json_body={"prompt": 1}).status_code == 401  # unknown caller: the key comes first
        assert post(tokens["user"]).status_code == 200 and post(tokens["admin"]).status_code == 200
        # the dashboard's roles (homeforge ui): an operator may call the model, a viewer may not
        assert post(tokens["operator"]).status_code == 200 and post(tokens["viewer"]).status_code == 403
        assert httpx.get(base + "/health").status_code == 200  # liveness needs no key
        m = lambda t: httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {t}"})  # noqa: E731
        assert m(tokens["metrics"]).status_code == 200 and m(tokens["user"]).status_code == 403
        assert m(tokens["viewer"]).status_code == 403
        assert httpx.get(base + "/metrics").status_code == 401
        # the official client with a key
        c = openai.OpenAI(base_url=base + "/v1", api_key=tokens["user"], max_retries=0)
        assert c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=3).choices[0].message.role == "assistant"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.PermissionDeniedError):
            openai.OpenAI(base_url=base + "/v1", api_key=tokens["metrics"], max_retries=0).models.list()
        # reload is for admins only, and keeps serving the same answers
        assert post(tokens["user"], "/admin/reload", {}).status_code == 403
        before = post(tokens["user"], json_body={"prompt": "def", "max_tokens": 5, "temperature": 0}).json()
        assert post(tokens["admin"], "/admin/reload", {}).status_code == 200
        after = post(tokens["user"], json_body={"prompt": "def", "max_tokens": 5, "temperature": 0}).json()
        assert before["choices"][0]["text"] == after["choices"][0]["text"]
        # revocation takes effect without a restart
        KeyStore.open(cfg.keys_file).revoke("user")
        assert post(tokens["user"]).status_code == 401
        # rate limit: 3 requests per minute
        codes = [post(tokens["limited"]).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = post(tokens["limited"])
        assert r.json()["error"]["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
    audit.close()
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    ok = [x for x in lines if x.get("route") == "/v1/completions" and x["status"] == 200]
    assert ok and all(x["key_id"] and x["role"] in ("user", "admin", "operator") for x in ok)
    assert ok[0]["prompt_tokens"] >= 1 and ok[0]["completion_tokens"] == 2 and ok[0]["latency_ms"] > 0
    assert ok[0]["model"] == "tiny" and "prompt" not in ok[0] and "completion" not in ok[0]
    assert {401, 403, 429} <= {x["status"] for x in lines}
    from homeforge.security.audit import verify

    assert verify(tmp_path / "audit.jsonl").ok  # the hash chain holds


def test_audit_text_is_pii_scrubbed_when_enabled(serve_cfg, tmp_path):
    from homeforge.serve.audit import RequestAudit

    cfg = serve_cfg.model_copy(update={"audit_text": True})
    audit = RequestAudit(tmp_path / "audit.jsonl", log_text=True)
    with running_server(cfg, audit=audit) as (base, _):
        r = httpx.post(base + "/v1/completions", json={
            "prompt": "Contact jane.doe@harbor-clinic.com or +1 415 555 0134 about", "max_tokens": 3})
        assert r.status_code == 200
    audit.close()
    rec = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()
           if '"/v1/completions"' in x][0]
    assert "jane.doe@harbor-clinic.com" not in rec["prompt"] and "555 0134" not in rec["prompt"]
    assert "Contact" in rec["prompt"] and "completion" in rec


def test_non_loopback_bind_needs_keys(serve_cfg):
    from homeforge.serve.app import check_bind, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("")
    store = KeyStore.open(serve_cfg.keys_file)
    with pytest.raises(HomeforgeError, match="refusing to listen on 0.0.0.0"):
        check_bind(serve_cfg.model_copy(update={"host": "0.0.0.0"}), store)
    check_bind(serve_cfg, store)  # loopback is fine without keys
    store.add("app", "user")
    check_bind(serve_cfg.model_copy(update={"host": "0.0.0.0"}), store)
    with pytest.raises(HomeforgeError):
        check_bind(serve_cfg.model_copy(update={"host": "0.0.0.0", "require_keys": False}), store)


def test_cors_off_unless_configured(serve_cfg):
    pre = {"Origin": "http://app.local", "Access-Control-Request-Method": "POST"}
    with running_server(serve_cfg) as (base, _):
        r = httpx.options(base + "/v1/completions", headers=pre)
        assert "access-control-allow-origin" not in r.headers
    with running_server(serve_cfg.model_copy(update={"cors_origins": ["http://app.local"]})) as (base, _):
        r = httpx.options(base + "/v1/completions", headers=pre)
        assert r.headers.get("access-control-allow-origin") == "http://app.local"

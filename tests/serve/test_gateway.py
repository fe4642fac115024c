"""Gateway mode against two real `homeforge serve` upstream processes on loopback (no mocked HTTP).

Balancing (checked with each upstream's own /metrics), keys/roles/limits at the gateway, streams
equal to direct streams token for token, upstream keys, health checks that take an upstream out
and back, upstream errors passed on, and failover when an upstream is killed (SIGKILL) mid-load.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from homeforge.config import ServeConfig
from homeforge.errors import HomeforgeError
from homeforge.serve.auth import KeyStore

from .conftest import ServeProcess, free_port, running_gateway, running_server

GEN = ("/v1/completions", "/v1/chat/completions")


def gw_cfg(tmp_path, upstreams, **kw) -> ServeConfig:
    a, b, key_file, _ = upstreams
    ups = [{"url": a.url}, {"url": b.url, "key_file": str(key_file)}]
    return ServeConfig(upstreams=ups, keys_file=str(tmp_path / "keys.json"), **kw)


def metric(url: str, name: str, key: str | None = None, **labels) -> float:
    """Sum of the samples of ``name`` (matching ``labels``) in the Prometheus text of ``url``/metrics."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def generations(up, key=None) -> float:
    """Generation requests an upstream answered with 200 (its own count)."""
    return sum(metric(up.url, "homeforge_requests_total", key, route=r, status="200") for r in GEN)


def upstream_tokens(upstreams) -> float:
    a, b, _, bkey = upstreams
    return sum(metric(u.url, f"homeforge_{k}_tokens_total", key) for u, key in ((a, None), (b, bkey))
               for k in ("prompt", "completion"))


def sse(url: str, body: dict, headers=None) -> dict:
    """A streamed answer: text pieces in order, finish reasons, usage, error events, [DONE]."""
    out = {"pieces": [], "finish": [], "usage": None, "errors": [], "done": False}
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=headers or {}, timeout=60) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            r.read()
            out["body"] = r.json()
            return out
        for line in r.iter_lines():
            if line == "data: [DONE]":
                out["done"] = True
            elif line.startswith("data: "):
                obj = json.loads(line[6:])
                if "error" in obj:
                    out["errors"].append(obj["error"]["message"])
                out["usage"] = obj.get("usage") or out["usage"]
                for c in obj.get("choices", []):
                    piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                    if piece:
                        out["pieces"].append(piece)
                    if c.get("finish_reason"):
                        out["finish"].append(c["finish_reason"])
    return out


def test_requests_spread_and_go_to_the_least_busy_upstream(upstreams, tmp_path):
    a, b, _, bkey = upstreams
    with running_gateway(gw_cfg(tmp_path, upstreams)) as (base, st):
        before = generations(a), generations(b, bkey)
        for i in range(6):  # one at a time: equal load, so the choice rotates
            r = httpx.post(base + "/v1/completions", json={"prompt": f"x{i}", "max_tokens": 2}, timeout=30)
            assert r.status_code == 200, r.text
        assert (generations(a) - before[0], generations(b, bkey) - before[1]) == (3, 3)

        # requests in flight on one upstream (held open here through the pool's own accounting, so the
        # check does not depend on timing): the next requests go to the other one
        pool = st.driver.pool
        for held, (free, _) in ((pool.ups[0], (b, bkey)), (pool.ups[1], (a, None))):
            counts = generations(a), generations(b, bkey)
            with pool.using(held), pool.using(held):
                for _ in range(3):
                    assert httpx.post(base + "/v1/completions", json={"prompt": "y", "max_tokens": 1},
                                      timeout=30).status_code == 200
            got = generations(a) - counts[0], generations(b, bkey) - counts[1]
            assert got == ((0, 3) if free is b else (3, 0))


def test_keys_roles_and_limits_are_enforced_at_the_gateway(upstreams, tmp_path):
    from homeforge.serve.audit import RequestAudit

    store = KeyStore.open(tmp_path / "keys.json")
    user = store.add("app", "user", requests_per_minute=3)[1]
    scraper = store.add("grafana", "metrics")[1]
    tpm = store.add("budget", "user", tokens_per_minute=5000)[1]
    audit = RequestAudit(tmp_path / "audit.jsonl")
    with running_gateway(gw_cfg(tmp_path, upstreams), keys=store, audit=audit) as (base, st):
        r = httpx.post(base + "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
        r = httpx.post(base + "/v1/completions", json={"prompt": "x"}, headers={"Authorization": f"Bearer {scraper}"})
        assert r.status_code == 403
        assert httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {scraper}"}).status_code == 200
        auth = {"Authorization": f"Bearer {user}"}
        for _ in range(3):
            assert httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth,
                              timeout=30).status_code == 200
        r = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1

        # tokens charged = what the upstreams counted themselves
        before = upstream_tokens(upstreams)
        auth = {"Authorization": f"Bearer {tpm}"}
        r = httpx.post(base + "/v1/completions", json={"prompt": "x", "n": 1.0}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # strict validation at the gateway
        for stream in (False, True):
            body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 7, "ignore_eos": True,
                    "temperature": 0}
            if stream:
                assert sse(base + "/v1/chat/completions", body, auth)["finish"] == ["length"]
            else:
                assert httpx.post(base + "/v1/chat/completions", json=body, headers=auth,
                                  timeout=30).json()["usage"]["completion_tokens"] == 7
        used = upstream_tokens(upstreams) - before
        kid = store.verify(tpm).id
        deadline = time.time() + 5
        while st.limiter._inflight[kid] and time.time() < deadline:
            time.sleep(0.02)
        assert sum(n for _, n in st.limiter._tokens[kid]) == used and used > 14
        audit.flush()
        lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
        chat = [x for x in lines if x.get("route") == "/v1/chat/completions"]
        assert len(chat) == 2 and all(x["key_id"] == kid and x["completion_tokens"] == 7 for x in chat)
        assert {x["upstream"] for x in chat} <= {upstreams[0].url, upstreams[1].url}
    audit.close()


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "def add(a, b):", "max_tokens": 24, "temperature": 0, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say something"}], "max_tokens": 24,
                              "temperature": 0, "ignore_eos": True}),
])
def test_streaming_through_the_gateway_equals_direct_streaming(upstreams, tmp_path, path, body):
    a = upstreams[0]
    direct = sse(a.url + path, body)
    assert len(direct["pieces"]) >= 10 and direct["finish"] == ["length"]
    with running_gateway(gw_cfg(tmp_path, upstreams)) as (base, _):
        for _ in range(2):  # both upstreams (same weights)
            via = sse(base + path, body)
            assert via["pieces"] == direct["pieces"], "the gateway must relay token by token"
            assert via["finish"] == direct["finish"] and via["usage"] == direct["usage"] and via["done"]
        whole = httpx.post(base + path, json=body, timeout=30).json()
        c = whole["choices"][0]
        assert (c.get("text") or c.get("message", {}).get("content")) == "".join(direct["pieces"])


def test_models_listed_or_aliased(upstreams, tmp_path):
    with running_gateway(gw_cfg(tmp_path, upstreams)) as (base, _):
        ids = [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]]
        assert ids == ["tiny-llama"]
        r = httpx.post(base + "/v1/completions", json={"model": "tiny-llama", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == "tiny-llama"
        r = httpx.post(base + "/v1/completions", json={"model": "gpt-4", "prompt": "x"})
        assert r.status_code == 404 and "tiny-llama" in r.json()["error"]["message"]
    with running_gateway(gw_cfg(tmp_path, upstreams, model_name="house-model")) as (base, _):
        assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == ["house-model"]
        r = httpx.post(base + "/v1/completions", json={"model": "house-model", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == "house-model"
        assert httpx.post(base + "/v1/completions", json={"model": "tiny-llama", "prompt": "x"}).status_code == 404


def test_a_client_that_leaves_mid_stream_is_charged_and_the_upstream_stops(upstreams, tmp_path):
    from homeforge.serve.audit import RequestAudit

    a, b, _, bkey = upstreams
    store = KeyStore.open(tmp_path / "keys.json")
    token = store.add("app", "user", tokens_per_minute=10_000)[1]
    audit = RequestAudit(tmp_path / "audit.jsonl")
    with running_gateway(gw_cfg(tmp_path, upstreams), keys=store, audit=audit) as (base, st):
        before = metric(a.url, "homeforge_completion_tokens_total") + \
            metric(b.url, "homeforge_completion_tokens_total", bkey)
        body = {"prompt": "def", "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen == 3:
                    break  # the client hangs up
        deadline = time.time() + 10
        kid = store.verify(token).id
        while (st.limiter._inflight[kid] or any(u.inflight for u in st.driver.pool.ups)) and time.time() < deadline:
            time.sleep(0.02)
        spent = sum(n for _, n in st.limiter._tokens[kid])
        assert 3 + 2 <= spent < 240  # the prompt and the tokens relayed, not the reservation
        time.sleep(1.0)  # the upstream's own accounting of the aborted request
        made = metric(a.url, "homeforge_completion_tokens_total") + \
            metric(b.url, "homeforge_completion_tokens_total", bkey) - before
        assert made < 240, "the upstream must stop generating when the client leaves"
    audit.close()
    line = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines() if "/v1/completions" in x][-1]
    assert line["finish_reasons"] == ["cancelled"] and line["prompt_tokens"] + line["completion_tokens"] == spent


def test_upstream_refusals_reach_the_client_with_their_field(upstreams, tmp_path):
    with running_gateway(gw_cfg(tmp_path, upstreams)) as (base, _):
        for stream in (False, True):
            r = httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 5000, "stream": stream})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "max_tokens" and "context" in err["message"], err


def test_upstream_key_is_used_and_never_shown(upstreams, tmp_path):
    a, b, key_file, _ = upstreams
    token = key_file.read_text().strip()
    cfg = ServeConfig(upstreams=[a.url, b.url], keys_file=str(tmp_path / "keys.json"))  # no key for b
    with running_gateway(cfg, healthy=1) as (base, st):
        time.sleep(0.3)
        down = [u for u in st.driver.pool.ups if not u.healthy]
        assert [u.url for u in down] == [b.url] and "401" in down[0].error
        for _ in range(4):
            assert httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
    with running_gateway(gw_cfg(tmp_path, upstreams)) as (base, st):
        shown = httpx.get(base + "/metrics").text + httpx.get(base + "/ready").text + repr(st.driver.pool.ups)
        assert token not in shown and "hfk_" not in shown


def test_an_upstream_leaves_the_pool_when_down_and_rejoins_when_healthy(upstreams, tmp_path, serve_cfg):
    a = upstreams[0]
    port = free_port()
    cfg = ServeConfig(upstreams=[a.url, f"http://127.0.0.1:{port}"], keys_file=str(tmp_path / "keys.json"),
                      gateway={"health_interval": 0.3, "max_backoff": 0.5})
    with running_gateway(cfg, healthy=1) as (base, st):
        late = st.driver.pool.ups[1]
        assert not late.healthy and "ConnectError" in late.error
        assert httpx.get(base + "/ready").status_code == 200
        for _ in range(3):  # served by a alone
            assert httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
        with running_server(serve_cfg.model_copy(update={"model_name": "tiny-llama"}), port=port) as (_, up_state):
            deadline = time.time() + 15
            while not late.healthy and time.time() < deadline:
                time.sleep(0.05)
            assert late.healthy, late.error
            for _ in range(4):
                assert httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200
            assert up_state.metrics.requests.labels("/v1/completions", "200", "anonymous")._value.get() >= 1
        deadline = time.time() + 15  # it stopped: out of the pool, requests still answered
        while late.healthy and time.time() < deadline:
            time.sleep(0.05)
        assert not late.healthy
        for _ in range(3):
            assert httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_failover_when_an_upstream_is_killed_mid_load(upstreams, tiny_model_dir, tmp_path):
    """SIGKILL one upstream while 8 clients run: no request that had not started streaming fails;
    those that had get finish_reason 'error' and an error event, then [DONE]; nobody hangs."""
    a = upstreams[0]
    c = ServeProcess([tiny_model_dir, "threads=1", "max_batch_size=2"], tmp_path / "c").start().wait_ready()
    cfg = ServeConfig(upstreams=[a.url, c.url], keys_file=str(tmp_path / "keys.json"),
                      gateway={"health_interval": 0.5, "max_backoff": 0.5})
    results: list[dict] = []
    stop = threading.Event()

    def client(k: int) -> None:
        while not stop.is_set():
            stream = k % 4 != 3  # six streaming clients, two not
            body = {"prompt": f"def f{k}(", "max_tokens": 48, "ignore_eos": True, "temperature": 0}
            rec = {"stream": stream}
            try:
                if stream:
                    out = sse(base + "/v1/completions", body)
                    rec.update(started=bool(out["pieces"]), errors=out["errors"], finish=out["finish"],
                               done=out["done"], ok=out["finish"] == ["length"] and out["done"] and not out["errors"])
                else:
                    r = httpx.post(base + "/v1/completions", json=body, timeout=60)
                    rec.update(started=False, status=r.status_code,
                               ok=r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 48)
            except Exception as exc:  # a hang (timeout) or a broken stream: counted as a failure
                rec.update(started=rec.get("started", False), ok=False, exc=repr(exc))
            results.append(rec)

    try:
        with running_gateway(cfg) as (base, st):
            victim = st.driver.pool.ups[1]
            threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(8)]
            for t in threads:
                t.start()
            deadline = time.time() + 60
            while (len(results) < 8 or victim.inflight < 3) and time.time() < deadline:
                time.sleep(0.01)
            assert victim.inflight >= 3, "the load never reached the upstream to kill"
            os.kill(c.proc.pid, signal.SIGKILL)
            n_at_kill = len(results)
            time.sleep(3)
            stop.set()
            for t in threads:
                t.join(90)
            assert not any(t.is_alive() for t in threads), "a client hung"
            outcomes = {k: metric(base, "homeforge_upstream_requests_total", upstream=c.url, outcome=k)
                        for k in ("retried", "broken")}
    finally:
        stop.set()
        c.stop()
    assert len(results) > n_at_kill + 4, "requests must go on after the kill"
    failed = [r for r in results if not r["ok"]]
    assert not [r for r in failed if not r["started"]], f"lost requests that had not started: {failed}"
    for r in failed:  # started streams cut by the kill: a clean end, never a hang
        assert r["finish"] == ["error"] and r["errors"] and r["done"], r
    assert outcomes["retried"] >= 1, outcomes  # queued requests of the dead upstream went elsewhere


def test_upstream_addresses_are_checked_before_anything_runs(tmp_path, monkeypatch):
    from homeforge.config import GatewayConfig, UpstreamConfig
    from homeforge.serve.gateway.pool import make_upstream

    gw = GatewayConfig()
    monkeypatch.delenv("HOMEFORGE_ALLOW_HOSTS", raising=False)
    with pytest.raises(HomeforgeError) as err:
        make_upstream(UpstreamConfig(url="http://10.0.0.5:8000"), gw)
    assert "HOMEFORGE_ALLOW_HOSTS=10.0.0.5" in err.value.render() and "not on this machine" in err.value.render()
    monkeypatch.setenv("HOMEFORGE_ALLOW_HOSTS", "10.0.0.0/24")  # allowed: built, never contacted here
    assert make_upstream(UpstreamConfig(url="http://10.0.0.5:8000/v1/"), gw).url == "http://10.0.0.5:8000"
    with pytest.raises(HomeforgeError, match="credentials inside its URL"):
        make_upstream(UpstreamConfig(url="http://user:secret@127.0.0.1:8000"), gw)
    with pytest.raises(HomeforgeError, match="not an http"):
        make_upstream(UpstreamConfig(url="ftp://127.0.0.1"), gw)
    with pytest.raises(HomeforgeError, match="NO_SUCH_KEY_VAR"):
        make_upstream(UpstreamConfig(url="http://127.0.0.1:1", key_env="NO_SUCH_KEY_VAR"), gw)
    with pytest.raises(HomeforgeError, match="cannot read its key file"):
        make_upstream(UpstreamConfig(url="http://127.0.0.1:1", key_file=str(tmp_path / "none")), gw)
    (tmp_path / "k").write_text("sk-secret\n")
    up = make_upstream(UpstreamConfig(url="http://127.0.0.1:1"), GatewayConfig(key_file=str(tmp_path / "k")))
    assert up.key == "sk-secret" and "sk-secret" not in repr(up)


def test_cli_gateway_errors_are_plain(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from homeforge.cli import app

    monkeypatch.delenv("HOMEFORGE_ALLOW_HOSTS", raising=False)
    run = CliRunner().invoke(app, ["serve", "--upstream", "http://10.0.0.5:8000", "--keys-file",
                                   str(tmp_path / "k.json")])
    assert "HOMEFORGE_ALLOW_HOSTS=10.0.0.5" in run.exception.render()
    run = CliRunner().invoke(app, ["serve", "--keys-file", str(tmp_path / "k.json")])
    assert "nothing to serve" in str(run.exception)
    assert "--upstream" in CliRunner().invoke(app, ["serve", "--help"]).output

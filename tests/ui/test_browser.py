"""`homeforge ui` in a real headless Chromium: log in, a dataset's report, a run started from the form whose
curve advances while it trains (then stopped), a gated promotion, a streamed chat against a real
`homeforge serve`, a viewer refused the keys page, and no request leaving loopback. Screenshots of each
page go to tests/artifacts/ui (or $HOMEFORGE_SCREENSHOTS)."""

from __future__ import annotations

import json
import re
import time
from urllib.parse import urlsplit

import httpx
import pytest

from .conftest import OFF_MACHINE, browser_missing, launch, screenshots_dir

# decided before any fixture is built: without a browser nothing is trained or started
pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def login(browser, dash, role: str):
    ctx = browser.new_context(viewport={"width": 1280, "height": 860})
    page = ctx.new_page()
    page.goto(dash["url"] + "/")
    assert page.url.startswith(dash["url"] + "/login")  # no session: sent to the login page
    page.fill("#token", dash["tokens"][role])
    page.click("#login")
    page.wait_for_url(re.compile(r".*/datasets$"))
    return ctx, page


def shot(page, name: str) -> None:
    page.screenshot(path=str(screenshots_dir() / f"{name}.png"), full_page=True)


def start_live_run(page, dash) -> None:
    page.goto(dash["url"] + "/runs/new")
    page.fill("#run-name", "live")
    page.select_option("#run-data", "data")
    for field, value in (("max_steps", "100000"), ("seq_len", "32"), ("log_every", "5"), ("eval_every", "100000"),
                         ("threads", "1")):
        page.fill(f"input[name='{field}']", value)
    page.fill("#run-overrides", "optim.weight_decay=0.05")
    assert "max_steps: 100000" in page.inner_text("#yaml-preview") and "weight_decay: 0.05" in page.inner_text("#yaml-preview")
    shot(page, "new-run")
    page.click("#start")
    page.wait_for_url(re.compile(r".*/runs/runs/live$"))
    # the YAML `homeforge train --config` takes, written and shown
    assert "max_steps: 100000" in page.inner_text("#config-yaml")
    written = (dash["root"] / "runs" / "live.yaml").read_text()
    assert "max_steps: 100000" in written and "weight_decay: 0.05" in written


@pytest.mark.slow
def test_start_a_run_from_the_form(chromium, dash):
    """Started first: the trainer imports torch while the next tests run; test_live_curve watches it."""
    ctx, page = login(chromium, dash, "operator")
    try:
        start_live_run(page, dash)
    finally:
        ctx.close()
    assert '"ui-run-start"' in dash["audit"].read_text()


def test_run_form_checks_the_config_like_the_cli(chromium, dash):
    ctx, page = login(chromium, dash, "operator")
    try:
        page.goto(dash["url"] + "/runs/new")
        page.fill("#run-name", "bad")
        page.fill("input[name='max_steps']", "-3")
        page.fill("input[name='optim.lr']", "fast")
        page.fill("#run-overrides", "optim.nonsense=1")
        page.click("#start")
        page.wait_for_selector("#run-error")
        err = page.inner_text("#run-error")
        assert "invalid configuration (3 problems)" in err and "max_steps" in err and "optim.lr" in err
        assert "optim.nonsense: unknown key" in err  # the CLI's own words for a bad override
        assert not (dash["root"] / "runs" / "bad.yaml").exists() and not (dash["root"] / "runs" / "bad").exists()
        shot(page, "new-run-refused")
    finally:
        ctx.close()


def test_login_and_dataset_report(chromium, dash):
    ctx, page = login(chromium, dash, "admin")
    try:
        assert "alice · admin" in page.inner_text("#whoami")
        shot(page, "datasets")
        page.click("a[href='/datasets/data']")
        page.wait_for_selector("#drops")
        report = json.loads((dash["root"] / "data" / "report.json").read_text())
        counts = page.inner_text("#counts")
        assert f"{report['records']['out']:,}" in counts and f"{report['records']['in']:,}" in counts
        drops = page.inner_text("#drops")
        for reason, n in report["records"]["dropped"].items():
            assert reason in drops and f"{n:,}" in drops
        assert "not encrypted" in page.inner_text("#encryption")
        manifest = json.loads((dash["root"] / "data" / "homeforge.json").read_text())
        assert manifest["content_hash"] in page.inner_text("#lineage")
        # the plots prepare drew are served and decode as images
        assert page.eval_on_selector("img.plot", "img => img.complete && img.naturalWidth > 100")
        shot(page, "dataset")
        page.click("#verify")  # `homeforge verify` from the page: seal, every file, recorded inputs
        page.wait_for_selector("#provenance")
        assert "every check passed" in page.inner_text("#verify-result")
        assert "files match their recorded hashes" in page.inner_text("#provenance")
        page.click("#logout")
        page.wait_for_url(re.compile(r".*/login$"))
        page.goto(dash["url"] + "/datasets")
        assert "/login" in page.url  # the session is gone
    finally:
        ctx.close()


def test_evaluation_page_shows_the_paired_test(chromium, dash):
    ctx, page = login(chromium, dash, "viewer")
    try:
        page.goto(dash["url"] + "/models")
        page.click("a[href='/evals/better/model-eval']")
        page.wait_for_selector("#ab")
        result = json.loads((dash["root"] / "better" / "model-eval" / "eval.json").read_text())
        t = result["comparison"]["perplexity"]
        ab = page.inner_text("#ab")
        assert "perplexity" in ab and f"{t['p_value']:.4g}" in ab and f"{t['delta']:.4g}" in ab
        assert f"{result['model']['perplexity']['ppl']:.4g}" in page.inner_text("#eval-metrics")
        shot(page, "evaluation")
    finally:
        ctx.close()


def test_promote_through_the_gate_and_roll_back(chromium, dash):
    ctx, page = login(chromium, dash, "operator")
    try:
        page.goto(dash["url"] + "/models")
        assert "@candidate=v2 @champion=v1" in page.inner_text("#reg-docs")
        page.fill("#reg-docs ~ form input[name='min_improvement']", "100")  # an impossible bar: refused, p shown
        page.click("#promote-docs")
        page.wait_for_selector("#registry-message.bad")
        refused = page.inner_text("#registry-message")
        assert "refused" in refused and "p=" in refused and "@champion=v1" in page.inner_text("#reg-docs")
        page.click("#promote-docs")  # the default gate: v2 is significantly better on the same documents
        page.wait_for_selector("#registry-message.good")
        msg = page.inner_text("#registry-message")
        assert "promoted docs version 2 to @champion" in msg and "paired bootstrap p=" in msg
        assert "@champion=v2" in page.inner_text("#reg-docs")
        shot(page, "models")
        page.click("#rollback-docs")
        page.wait_for_selector("#registry-message.good")
        assert "docs@champion -> version 1 (was 2)" in page.inner_text("#registry-message")
    finally:
        ctx.close()
    log = dash["audit"].read_text()
    for event in ("registry-promote-refused", "registry-promote", "registry-rollback", "ui-registry-promote",
                  "ui-registry-rollback"):
        assert f'"{event}"' in log, event


@pytest.mark.slow
def test_playground_side_by_side_streams_two_versions(chromium, dash, served):
    """Pane a: the server given with --serve-url (docs v2); pane b: docs@champion (v1 after the rollback),
    served from the playground's own button. Each streamed answer is its server's greedy answer."""
    ctx, page = login(chromium, dash, "operator")
    try:
        page.goto(dash["url"] + "/playground")
        assert "docs-v2" in page.inner_text("#pane-a select")
        page.click("#serve-docs-champion")  # `homeforge serve registry:docs@champion`, started by the dashboard
        started = re.search(r"running at (http://127\.0\.0\.1:\d+)", page.inner_text("#serve-versions")).group(1)
        deadline = time.time() + 120
        while started not in page.inner_text("#pane-b select"):  # listed once its model is loaded
            assert time.time() < deadline, "the registry version was not served"
            time.sleep(1)
            page.reload()
        champion = httpx.get(started + "/v1/models", timeout=10).json()["data"][0]
        assert champion.get("version", "").startswith("docs@v1")
        value = page.eval_on_selector("#pane-b select.model", "(s, url) => [...s.options].find(o => o.text.includes(url)).value",
                                      started)
        page.select_option("#pane-b select.model", value=value)
        page.fill("#chat-input", "def add(a, b):")
        page.fill("#chat-max", "12")
        page.click("#send")
        for side in ("a", "b"):
            page.wait_for_selector(f"#pane-{side} .msg.assistant[data-done='yes']", timeout=60_000)
        for side, url, model in (("a", dash["serve_url"], "docs-v2"), ("b", started, champion["id"])):
            expected = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 12,
                "temperature": 0}).json()["choices"][0]["message"]["content"]
            answer = page.query_selector(f"#pane-{side} .msg.assistant")
            assert "bad" not in (answer.get_attribute("class") or "")
            assert answer.text_content() == expected and expected, side
            assert int(answer.get_attribute("data-chunks")) >= 2  # streamed in pieces, not one block
        shot(page, "playground")
    finally:
        ctx.close()
    log = dash["audit"].read_text()
    assert '"ui-serve-start"' in log and '"ui-chat"' in log


def test_viewer_is_refused(chromium, dash):
    ctx, page = login(chromium, dash, "viewer")
    try:
        nav = page.inner_text("header nav")
        assert "Datasets" in nav and "Keys & roles" not in nav and "Playground" not in nav
        for path in ("/security", "/runs/new", "/playground"):
            resp = page.goto(dash["url"] + path)
            assert resp.status == 403 and "needs" in page.inner_text("#refusal"), path
        shot(page, "viewer-refused")
        # an action without the form's CSRF token is refused too, whatever the role
        r = ctx.request.post(dash["url"] + "/registry/promote", form={"name": "docs"})
        assert r.status == 403
    finally:
        ctx.close()
    assert '"ui-refused"' in dash["audit"].read_text()


@pytest.mark.slow
def test_live_curve_advances_then_stop(chromium, dash):
    ctx, page = login(chromium, dash, "operator")
    try:
        if not (dash["root"] / "runs" / "live.yaml").is_file():  # run alone (-k): start it here
            start_live_run(page, dash)
        page.goto(dash["url"] + "/runs/runs/live")
        loss = "div.chartbox[data-metric='loss'] path.series"
        page.wait_for_function(f"() => Number(document.querySelector(\"{loss}\")?.dataset.n || 0) >= 2",
                               timeout=90_000)
        first = int(page.get_attribute(loss, "data-n"))
        page.wait_for_function(f"() => Number(document.querySelector(\"{loss}\").dataset.n) > {first}", timeout=30_000)
        shot(page, "run-live")
        page.click("#stop")
        deadline = time.time() + 60
        while page.query_selector("#resume") is None:  # SIGTERM: checkpoint, exit; then it can be resumed
            assert time.time() < deadline, "the run did not stop"
            time.sleep(0.5)
            page.reload()
        ckpts = [p.name for p in (dash["root"] / "runs" / "live" / "checkpoints").iterdir() if p.name.startswith("step-")]
        assert ckpts
        stopped_at = max(int(c.split("-")[1]) for c in ckpts)
        page.click("#resume")  # `homeforge train --config ... --resume latest`: the curve goes on from there
        page.wait_for_selector("#stop")
        page.wait_for_function(f"() => Number(document.querySelector(\"{loss}\")?.dataset.n || 0) * 5 > {stopped_at} + 10",
                               timeout=90_000)
        page.click("#stop")
    finally:
        ctx.close()
    log = dash["audit"].read_text()
    assert '"ui-run-stop"' in log and '"ui-run-resume"' in log


def netlog_requests(path) -> list[dict]:
    """Every URL request in Chromium's network log: url, initiator, network isolation key.

    A page's requests (documents, scripts, images, fetches, including any a page would make to another
    host) carry the page's origin as initiator or network isolation key; the browser's own service
    requests (component updates, account checks) carry neither, and cannot resolve here anyway."""
    text = path.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # the browser did not close the log's last event list
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    out = []
    for e in log["events"]:
        p = e.get("params") or {}
        if start.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in p:
            out.append({"url": p["url"], "initiator": str(p.get("initiator", "")),
                        "isolation": str(p.get("network_isolation_key", ""))})
    return out


def test_no_request_leaves_loopback(playwright, dash, tmp_path):
    """Every page opened as admin: the page's request events, Chromium's own network log and the egress
    guard's audit lines (in the dashboard's process) all show nothing but loopback."""
    netlog = tmp_path / "netlog.json"
    browser = launch(playwright, netlog)
    seen: list[str] = []
    try:
        ctx, page = login(browser, dash, "admin")
        page.on("request", lambda r: seen.append(r.url))
        both = "&ids=runs/live" if (dash["root"] / "runs" / "live").is_dir() else ""
        pages = ["/datasets", "/datasets/data", "/runs", "/runs/base", f"/compare?ids=base{both}", "/models",
                 "/evals/better/model-eval",
                 "/playground", "/audit", "/audit?event=ui-login", "/security", "/runs/new"]
        for path in pages:
            assert page.goto(dash["url"] + path).status == 200, path
            if page.query_selector("div.charts"):  # the script's fetches, too
                page.wait_for_selector("div.chartbox path.series", state="attached", timeout=10_000)
            if path.startswith("/compare"):  # one line per run in each chart
                n = len(page.query_selector_all("div.chartbox[data-metric='loss'] path.series"))
                assert n == path.count("ids="), (path, n)
                shot(page, "compare")
        page.goto(dash["url"] + "/playground")
        unreachable = " ".join(e.inner_text() for e in page.query_selector_all("p.bad"))
        assert "192.0.2.1" in unreachable and "refused" in unreachable  # the guard refused it
        page.goto(dash["url"] + "/audit")
        assert "audit log intact" in page.inner_text("#verify")
        shot(page, "audit")
        page.goto(dash["url"] + "/security")
        shot(page, "keys")
        page.goto(dash["url"] + "/runs/base")
        page.wait_for_selector("div.chartbox path.series", state="attached")
        shot(page, "run")
        ctx.close()
    finally:
        browser.close()
    assert seen and all(urlsplit(u).hostname in LOOPBACK for u in seen if u.startswith(("http", "ws"))), seen
    requests = netlog_requests(netlog)
    ours = [r for r in requests if dash["url"] in r["initiator"] or "127.0.0.1" in r["isolation"]]
    assert len(ours) >= len(pages)  # the log holds the pages' requests
    outside = [r for r in ours if urlsplit(r["url"]).hostname not in LOOPBACK]
    assert not outside, f"requests of the dashboard's pages that left loopback: {outside}"
    # the dashboard's egress guard is on: it refused the one server configured off the machine, nothing else
    since = dash["audit"].read_bytes()[dash["audit_start"]:].decode()  # other tests' refusals share the file
    refused = [json.loads(line) for line in since.splitlines() if '"egress-refused"' in line]
    assert refused and all(e["host"] == urlsplit(OFF_MACHINE).hostname for e in refused), refused

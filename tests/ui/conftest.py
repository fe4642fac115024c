"""A dashboard over a real root folder, for the browser tests.

The root holds a prepared dataset and a trained model (registered as ``docs`` with no champion yet);
a real ``homeforge serve`` of that model and a real ``homeforge ui`` (with keys for the three roles)
run on loopback as subprocesses; a headless Chromium (Debian's ``chromium`` package, not Playwright's
download) is driven by Playwright. Without Playwright or Chromium the browser tests skip, saying which.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path(os.environ.get("HOMEFORGE_CHROMIUM", "/usr/bin/chromium"))
# Chromium's own services (updates, autofill and optimization-guide queries, network time, sync) off, and
# every name but loopback unresolvable, so the browser itself sends nothing off the machine either
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-default-apps", "--disable-domain-reliability",
                 "--disable-client-side-phishing-detection", "--no-pings",
                 "--disable-features=Translate,MediaRouter,AutofillServerCommunication,OptimizationHints,"
                 "OptimizationGuideModelDownloading,OptimizationHintsFetching,OptimizationTargetPrediction,"
                 "NetworkTimeServiceQuerying",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"]


# a server the playground is pointed at that is not on this machine (TEST-NET-1): the egress guard of the
# dashboard's process must refuse to connect to it
OFF_MACHINE = "http://192.0.2.1:8000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshots_dir() -> Path:
    d = Path(os.environ.get("HOMEFORGE_SCREENSHOTS") or Path(__file__).parents[1] / "artifacts" / "ui")
    d.mkdir(parents=True, exist_ok=True)
    return d


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, f"{url} not up after {timeout} s"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read() if proc.stdout else ""


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install playwright); the browser tests need it"
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set HOMEFORGE_CHROMIUM)"
    return None


def need_browser():
    """Playwright's sync API and a Chromium executable, or a clean skip naming what is missing."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    return sync_playwright


@pytest.fixture(scope="module")
def dash(tiny_dataset, tmp_path_factory):
    """``{"url", "root", "tokens": {role: token}, "serve_url", "env", "audit"}`` with both servers running."""
    need_browser()
    from rich.console import Console

    from homeforge.config import EvalConfig, TrainConfig, load_config
    from homeforge.evaluate.run import run as evaluate
    from homeforge.registry.store import Registry
    from homeforge.serve.auth import KeyStore
    from homeforge.train.run import run

    tmp = tmp_path_factory.mktemp("ui")
    from homeforge import paths

    # the session's audit log is shared with every other test: this module reads only what comes after here
    audit_start = paths.audit_log().stat().st_size if paths.audit_log().is_file() else 0
    root = tmp / "root"
    shutil.copytree(tiny_dataset, root / "data")
    store = KeyStore.open(tmp / "keys.json")
    tokens = {role: store.add(name, role)[1] for name, role in (("alice", "admin"), ("olga", "operator"),
                                                                 ("victor", "viewer"))}
    env = {**os.environ, "HOMEFORGE_REGISTRY": str(tmp / "registry"), "OMP_NUM_THREADS": "1"}
    env.pop("HOMEFORGE_ALLOW_NETWORK", None)  # the egress guard stays on in both servers
    sport, uport = free_port(), free_port()
    serve_url, ui_url = f"http://127.0.0.1:{sport}", f"http://127.0.0.1:{uport}"
    ui = subprocess.Popen([sys.executable, "-m", "homeforge", "ui", "--root", str(root), "--port", str(uport),
                           "--keys-file", str(tmp / "keys.json"), "--serve-url", serve_url, "--serve-url", serve_url,
                           "--serve-url", OFF_MACHINE],
                          cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # while the dashboard starts: a weak and a better model of the dataset, each evaluated on the same documents
    # (the better one with the weak one as its baseline: paired tests), registered as docs v1 @champion and
    # v2 @candidate, so the promotion through the gate is a real paired comparison
    evals = {}
    for name, steps in (("base", 3), ("better", 60)):
        cfg = load_config(TrainConfig, overrides=[f"data={root / 'data'}", f"output_dir={root / name}",
                                                  "model.preset=debug", f"max_steps={steps}", "seq_len=64",
                                                  "eval_every=30", "optim.lr=3e-3", "tracking.tensorboard=false",
                                                  "threads=1"])
        run(cfg, console=Console(quiet=True))
        ecfg = load_config(EvalConfig, overrides=["robustness.enabled=false", "generation.enabled=false",
                                                  "max_examples=40", "threads=1"])
        evals[name] = root / name / "model-eval"
        evaluate(root / name / "model", root / "data", ecfg, root / "base" / "model" if name == "better" else None,
                 evals[name], False, Console(quiet=True))
    reg = Registry(tmp / "registry")
    reg.register(root / "base" / "model", "docs", eval_dir=evals["base"], alias="champion")
    reg.register(root / "better" / "model", "docs", eval_dir=evals["better"], alias="candidate")
    try:
        wait_http(ui_url + "/login", ui)
        yield {"url": ui_url, "root": root, "tokens": tokens, "serve_url": serve_url, "serve_port": sport, "env": env,
               "audit": paths.audit_log(), "audit_start": audit_start, "tmp": tmp}
    finally:
        import psutil

        children = psutil.Process(ui.pid).children(recursive=True) if ui.poll() is None else []
        stop(ui)  # SIGTERM: the dashboard stops the trainers and servers it started, then exits
        _, alive = psutil.wait_procs(children, timeout=20)
        for proc in alive:
            proc.kill()
        assert not alive, f"the dashboard left processes running: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def served(dash):
    """`homeforge serve` of the trained model at the address the dashboard's playground was given."""
    serve = subprocess.Popen([sys.executable, "-m", "homeforge", "serve", str(dash["root"] / "better" / "model"),
                              "--port", str(dash["serve_port"]), "--keys-file", str(dash["tmp"] / "no-keys.json"),
                              "--model-name", "docs-v2", "threads=1"], cwd=dash["tmp"], env=dash["env"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(dash["serve_url"] + "/ready", serve)
        yield dash["serve_url"]
    finally:
        stop(serve)


@pytest.fixture(scope="module")
def playwright():
    sync_playwright = need_browser()
    with sync_playwright() as p:
        yield p


def launch(playwright, netlog: Path | None = None):
    """A headless Chromium; with ``netlog`` it writes its own log of every network request there."""
    args = [*CHROMIUM_ARGS, *([f"--log-net-log={netlog}"] if netlog else [])]
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)


@pytest.fixture(scope="module")
def chromium(playwright):
    browser = launch(playwright)
    try:
        yield browser
    finally:
        browser.close()

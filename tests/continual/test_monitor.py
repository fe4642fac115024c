"""`homeforge monitor`: shifted traffic is flagged, unshifted traffic is not (false alarms over repeated samples)."""

from __future__ import annotations

import json
import sysconfig
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest


def in_domain(tok, data: Path, n: int, seed: int) -> list[str]:
    """Held-out text of the training data itself (the validation split), cut into prompts of ~40 tokens."""
    from homeforge.data.dataset import DatasetReader

    val = np.asarray(DatasetReader.open(data).tokens("val"))
    starts = np.random.default_rng(seed).integers(0, len(val) - 40, n)
    return [tok.decode(val[s:s + 40].tolist()) for s in starts]


def code_lines(n: int, seed: int) -> list[str]:
    """Another domain: lines of Python code (not docstrings) from the standard library."""
    src = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().splitlines()
    lines = [ln.strip() for ln in src if ln.strip() and not ln.strip().startswith(("#", '"', "'")) and len(ln) > 25]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(lines, 3)) for _ in range(n)]


def psi_of(tok, data: Path, prompts: list[str]) -> float:
    from homeforge.monitor import drift
    from homeforge.monitor.report import training_counts

    counts, _ = training_counts(data, len(tok), 2_000_000)
    bins = drift.token_bins(counts, 20)
    ids = np.asarray([t for p in prompts for t in tok(p, add_special_tokens=False)["input_ids"]])
    return drift.psi(drift.binned(counts, bins, 20), drift.binned(np.bincount(ids, minlength=len(tok)), bins, 20))


def test_psi_false_alarms_and_detection(tiny_tokenizer, tiny_dataset):
    """20 samples of 30 in-domain prompts: no alarm at PSI 0.2; 20 samples of code: every one flagged."""
    same = [psi_of(tiny_tokenizer, tiny_dataset, in_domain(tiny_tokenizer, tiny_dataset, 30, s)) for s in range(20)]
    shifted = [psi_of(tiny_tokenizer, tiny_dataset, code_lines(30, s)) for s in range(20)]
    false_alarms = sum(p > 0.2 for p in same)
    assert false_alarms == 0 and max(same) < 0.1, same
    assert min(shifted) > 0.2, shifted
    from homeforge.monitor import drift

    p = drift.binned(np.arange(50.0), np.arange(50) % 20, 20)
    assert drift.psi(p, p) == pytest.approx(0, abs=1e-12) and drift.js(p, p) == pytest.approx(0, abs=1e-12)
    rng = np.random.default_rng(0)
    x, y, z = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)), rng.normal(1.0, 1, size=(40, 8))
    assert abs(drift.mmd2(x, y)) < 0.05 < drift.mmd2(x, z)


def _log(folder: Path, prompts: list[str], latency: float) -> None:
    from homeforge.continual.feedback import FeedbackLog

    log = FeedbackLog(folder, encrypt=False)  # no data key here: the session's artifacts are unsigned
    for i, p in enumerate(prompts):
        log.append({"type": "exchange", "id": f"r{i}", "prompt": p, "response": "Return the value.",
                    "completion_tokens": 5, "latency_ms": latency + i, "ttft_ms": 3.0, "finish_reason": "stop"})
    log.close()


def test_monitor_report_gauges_alert_exit_and_webhook(tiny_model_dir, tiny_tokenizer, tiny_dataset, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from homeforge.config import MonitorThresholds
    from homeforge.monitor.report import run

    _log(tmp_path / "same", in_domain(tiny_tokenizer, tiny_dataset, 40, 99), 20.0)
    rep = run(tmp_path / "same", tiny_model_dir, tiny_dataset, tmp_path / "r1", MonitorThresholds(ppl_ratio=None))
    assert rep["alerts"] == [] and rep["figures"]["exchanges"] == 40
    assert rep["figures"]["latency_p50_ms"] == pytest.approx(39.5) and rep["figures"]["latency_p99_ms"] < 60
    for f in ("report.md", "report.json", "drift.png"):
        assert (tmp_path / "r1" / f).stat().st_size > 0
    gauges = {m.name: m.samples[0].value for m in text_string_to_metric_families((tmp_path / "r1" /
                                                                                  "metrics.prom").read_text())}
    assert gauges["homeforge_monitor_psi"] == pytest.approx(rep["figures"]["psi"], rel=1e-4)
    assert gauges["homeforge_monitor_alerts"] == 0

    got = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *a):
            pass

    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    _log(tmp_path / "shifted", code_lines(40, 7), 20.0)
    from homeforge.monitor.report import DriftAlert

    try:
        with pytest.raises(DriftAlert) as err:
            from typer.testing import CliRunner

            from homeforge.cli import app

            res = CliRunner().invoke(app, ["monitor", str(tmp_path / "shifted"), "--model", str(tiny_model_dir),
                                           "--data", str(tiny_dataset), "--output", str(tmp_path / "r2"),
                                           "--webhook", f"http://127.0.0.1:{hook.server_port}/alert", "p99_ms=30"],
                                     catch_exceptions=False)
            raise AssertionError(res.output)
    finally:
        hook.shutdown()
    assert err.value.exit_code == 4
    alerts = json.loads((tmp_path / "r2" / "report.json").read_text())["alerts"]
    assert any("PSI" in a for a in alerts) and any("P99" in a for a in alerts)
    assert got and got[0]["alerts"] == alerts


def test_served_classifier_shifted_traffic_is_flagged(tiny_classifier_dir, tiny_tokenizer, tiny_dataset, tmp_path):
    """A served classifier gets 8 samples of in-domain traffic and 8 of shifted traffic (30 texts each) through
    the real API; `monitor` figures per sample: no false alarm on the in-domain ones, every shifted one flagged."""
    import httpx

    from homeforge.config import MonitorThresholds, ServeConfig
    from homeforge.continual.feedback import joined
    from homeforge.monitor.report import alerts, compute

    from .conftest import running_server

    cfg = ServeConfig(model_dir=str(tiny_classifier_dir), keys_file=str(tmp_path / "k.json"),
                      feedback={"enabled": True, "dir": str(tmp_path / "fb"), "encrypt": False})
    ids = {}
    with running_server(cfg) as (base, state):
        for s in range(8):
            for kind, texts in (("same", in_domain(tiny_tokenizer, tiny_dataset, 30, 100 + s)),
                                ("shifted", code_lines(30, 200 + s))):
                r = httpx.post(base + "/v1/classifications", json={"input": texts}, timeout=60).json()
                assert len(r["data"]) == 30 and r["id"].startswith("clf-")
                ids[r["id"]] = kind
        state.feedback.flush()
    groups: dict[str, list] = {}
    for e in joined(tmp_path / "fb"):
        groups.setdefault(e["request"], []).append(e)
    assert len(groups) == 16 and all(len(g) == 30 and g[0]["scores"] for g in groups.values())
    t = MonitorThresholds()
    flagged = {"same": 0, "shifted": 0}
    for rid, g in groups.items():
        fig = compute(g, tiny_classifier_dir, tiny_dataset, last=None)
        flagged[ids[rid]] += bool(alerts(fig, t))
        assert fig.get("prompt_ppl") is None and set(fig["class_shares"]) == {"billing", "fraud", "other"}
    assert flagged == {"same": 0, "shifted": 8}, flagged
    first, shifted = next(g for r, g in groups.items() if ids[r] == "same"), \
        next(g for r, g in groups.items() if ids[r] == "shifted")
    fig = compute(first + shifted, tiny_classifier_dir, tiny_dataset, last=30)
    assert fig["class_psi"] >= 0 and "class_psi" in fig

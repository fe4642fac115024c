"""`homeforge monitor`: recent traffic against the training data; report, gauges, alerts.

Traffic is the feedback log of `homeforge serve` (``feedback.enabled``): the last ``last``
exchanges (or those of the last ``since_hours``). Figures:

- input drift: PSI and Jensen-Shannon divergence of the prompts' token distribution against
  the training split's (binned by training frequency, see ``drift``); the perplexity of the
  prompts under the model against its perplexity on the training data's validation split;
  optionally the MMD of mean-pooled hidden states (``embeddings``);
- output drift: response perplexity under the model (its confidence), mean response length
  (against the earlier traffic, when there is some), refusal rate, share cut at max_tokens;
- latency P50/P99 (end to end, as the server measured it) and time to first token.

Written to ``OUT``: ``report.json``, ``report.md``, ``drift.png`` and ``metrics.prom``
(the same figures as Prometheus gauges, for the node exporter's textfile collector). A
figure past its threshold (``MonitorThresholds``) is an alert: a log line, an audit line,
an optional JSON POST to a loopback webhook, and the command's exit code 4.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from homeforge.config import MonitorThresholds
from homeforge.errors import HomeforgeError
from homeforge.monitor import drift

ALERT_EXIT = 4


class DriftAlert(HomeforgeError):
    """Monitoring found figures past their thresholds (the report is written)."""

    exit_code = ALERT_EXIT


def traffic(feedback: Path, last: int | None, since_hours: float | None) -> list[dict]:
    from homeforge.continual.feedback import joined

    ex = sorted(joined(feedback), key=lambda r: r.get("time", 0))
    if since_hours is not None:
        ex = [r for r in ex if r.get("time", 0) >= time.time() - since_hours * 3600]
    if not ex:
        raise HomeforgeError(f"the feedback log {feedback} holds no exchange" +
                             (f" in the last {since_hours} hours" if since_hours is not None else ""),
                             where=str(feedback), fix="serve with feedback.enabled=true and let traffic arrive, "
                                                      "or widen --since-hours")
    return ex


def prompt_text(rec: dict) -> str:
    if rec.get("messages"):
        return "\n".join(m.get("content", "") for m in rec["messages"] if isinstance(m.get("content"), str))
    return rec.get("prompt", "") or ""


def training_counts(data: Path, vocab: int, max_tokens: int) -> tuple[np.ndarray, list[list[int]]]:
    """Token counts of the training split (up to ``max_tokens``) and a few validation documents."""
    from homeforge.data.dataset import DatasetReader

    reader = DatasetReader.open(data)
    if reader.kind == "text":
        train = np.asarray(reader.tokens("train")[:max_tokens], dtype=np.int64)
        split = "val" if "val" in reader.index.get("splits", {}) else "train"
        val = np.asarray(reader.tokens(split)[:max(4096, min(max_tokens // 20, 65536))], dtype=np.int64)
        docs = [val[i:i + 128].tolist() for i in range(0, len(val) - 128, 128)][:64]
    else:
        recs = reader.token_records("train", ("input_ids",), limit=20_000)
        ids = [t for r in recs for t in r["input_ids"]][:max_tokens]
        train = np.asarray(ids, dtype=np.int64)
        docs = [r["input_ids"][:128] for r in recs[-64:]]
    if len(train) == 0:
        raise HomeforgeError(f"the training data {data} holds no tokens", where=str(data))
    return np.bincount(train[train < vocab], minlength=vocab), docs


def ppl_of(model, docs: list[list[int]], prefix: int) -> float | None:
    from homeforge.evaluate.lm import document_nll

    docs = [[prefix, *d[:255]] for d in docs if d]
    if not docs:
        return None
    nll, count = document_nll(model, docs, context=256, batch_size=8)
    return math.exp(float(nll.sum()) / max(1, int(count.sum())))


def embed(model, docs: list[list[int]]) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for d in docs:
            h = model(input_ids=torch.tensor([d[:128] or [0]]), output_hidden_states=True).hidden_states[-1]
            out.append(h[0].mean(0).float().numpy())
    return np.stack(out)


def compute(ex: list[dict], model_dir: Path, data: Path, *, last: int | None, n_bins: int = 20,
            embeddings: bool = False, max_train_tokens: int = 2_000_000) -> dict:
    import torch

    from homeforge.evaluate.lm import prefix_id
    from homeforge.models.io import classifier_architecture, load_causal_lm, load_classifier

    recent = ex[-last:] if last else ex
    earlier = ex[:-last] if last and len(ex) > last else []
    classifier = bool(classifier_architecture(model_dir))
    model, tok = load_classifier(model_dir) if classifier else load_causal_lm(model_dir)
    model.eval()
    vocab = model.get_input_embeddings().num_embeddings
    counts, val_docs = training_counts(data, vocab, max_train_tokens)
    prompts = [tok(prompt_text(r), add_special_tokens=False)["input_ids"] for r in recent]
    ids = np.asarray([t for p in prompts for t in p if t < vocab], dtype=np.int64)
    if len(ids) == 0:
        raise HomeforgeError("the recent traffic has no prompt text to compare", fix="check the feedback log")
    bins = drift.token_bins(counts, n_bins)
    p_train, p_traffic = drift.binned(counts, bins, n_bins), drift.binned(np.bincount(ids, minlength=vocab), bins,
                                                                          n_bins)
    fig = {"exchanges": len(recent), "earlier_exchanges": len(earlier), "prompt_tokens": int(len(ids)),
           "psi": drift.psi(p_train, p_traffic), "js": drift.js(p_train, p_traffic)}
    if classifier:  # no perplexities; the predicted classes instead
        fig.update(class_shift(recent, earlier))
    prefix = prefix_id(tok)
    with torch.no_grad():
        if classifier:
            prefix = None
        if prefix is not None:
            fig["train_ppl"] = ppl_of(model, val_docs, prefix)
            fig["prompt_ppl"] = ppl_of(model, prompts, prefix)
            responses = [tok(r.get("response") or "", add_special_tokens=False)["input_ids"] for r in recent]
            fig["response_ppl"] = ppl_of(model, [r for r in responses if r], prefix)
        if embeddings:
            rng = np.random.default_rng(0)
            pick = rng.choice(len(val_docs), size=min(len(val_docs), 64), replace=False) if val_docs else []
            fig["mmd"] = drift.mmd2(embed(model, [val_docs[i] for i in pick]), embed(model, prompts[:64]))
    if fig.get("train_ppl") and fig.get("prompt_ppl"):
        fig["ppl_ratio"] = fig["prompt_ppl"] / fig["train_ppl"]
    lengths = [r.get("completion_tokens") or 0 for r in recent]
    fig["response_tokens_mean"] = float(np.mean(lengths))
    if earlier:
        before = float(np.mean([r.get("completion_tokens") or 0 for r in earlier]))
        fig["length_ratio"] = fig["response_tokens_mean"] / before if before > 0 else None
    fig["refusal_rate"] = drift.refusal_rate([r.get("response") or "" for r in recent])
    fig["cut_at_max_tokens"] = sum(1 for r in recent if r.get("finish_reason") == "length") / len(recent)
    lat = [r.get("latency_ms") for r in recent]
    ttft = [r.get("ttft_ms") for r in recent]
    fig.update(latency_p50_ms=drift.quantile(lat, 0.5), latency_p99_ms=drift.quantile(lat, 0.99),
               ttft_p50_ms=drift.quantile(ttft, 0.5), ttft_p99_ms=drift.quantile(ttft, 0.99))
    ratings = [r["rating"] for r in recent if isinstance(r.get("rating"), (int, float))]
    fig["rating_mean"] = float(np.mean(ratings)) if ratings else None
    fig["_bins"] = {"train": p_train.tolist(), "traffic": p_traffic.tolist()}
    fig["_latency"] = [x for x in lat if x is not None]
    return fig


def class_shift(recent: list[dict], earlier: list[dict]) -> dict:
    """Classifier traffic: the mean predicted class distribution, and its PSI against the earlier traffic."""
    def mean_scores(rows: list[dict]) -> dict[str, float] | None:
        rows = [r["scores"] for r in rows if isinstance(r.get("scores"), dict)]
        if not rows:
            return None
        names = sorted({k for r in rows for k in r})
        return {k: float(np.mean([r.get(k, 0.0) for r in rows])) for k in names}

    now, before = mean_scores(recent), mean_scores(earlier)
    out: dict = {"class_shares": now}
    if now and before:
        names = sorted(set(now) | set(before))
        p = np.maximum(np.array([before.get(k, 0.0) for k in names]), drift.EPS)
        q = np.maximum(np.array([now.get(k, 0.0) for k in names]), drift.EPS)
        out["class_psi"] = drift.psi(p / p.sum(), q / q.sum())
    return out


def alerts(fig: dict, t: MonitorThresholds) -> list[str]:
    out = []

    def over(key: str, limit, label: str) -> None:
        v = fig.get(key)
        if limit is not None and v is not None and math.isfinite(v) and v > limit:
            out.append(f"{label} {v:.4g} > {limit:g}")

    over("psi", t.psi, "input drift: token PSI")
    over("js", t.js, "input drift: token JS divergence")
    over("mmd", t.mmd, "input drift: embedding MMD^2")
    over("ppl_ratio", t.ppl_ratio, "input drift: prompt perplexity / training perplexity")
    over("refusal_rate", t.refusal_rate, "output drift: refusal rate")
    over("class_psi", t.class_psi, "output drift: predicted-class PSI vs earlier traffic")
    over("latency_p99_ms", t.p99_ms, "latency: P99 ms")
    lr = fig.get("length_ratio")
    if t.length_ratio is not None and lr and (lr > t.length_ratio or lr < 1 / t.length_ratio):
        out.append(f"output drift: response length x{lr:.3g} vs earlier traffic (limit x{t.length_ratio:g})")
    return out


GAUGES = ("psi", "js", "mmd", "class_psi", "ppl_ratio", "train_ppl", "prompt_ppl", "response_ppl", "response_tokens_mean",
          "length_ratio", "refusal_rate", "cut_at_max_tokens", "latency_p50_ms", "latency_p99_ms", "ttft_p50_ms",
          "ttft_p99_ms", "rating_mean", "exchanges")


def prometheus(fig: dict, n_alerts: int) -> str:
    lines = []
    for k in GAUGES:
        v = fig.get(k)
        if v is None or not math.isfinite(float(v)):
            continue
        lines += [f"# HELP homeforge_monitor_{k} homeforge monitor: {k.replace('_', ' ')}",
                  f"# TYPE homeforge_monitor_{k} gauge", f"homeforge_monitor_{k} {float(v):.6g}"]
    lines += ["# HELP homeforge_monitor_alerts figures past their thresholds", "# TYPE homeforge_monitor_alerts gauge",
              f"homeforge_monitor_alerts {n_alerts}"]
    return "\n".join(lines) + "\n"


def plot(fig: dict, out: Path) -> None:
    from homeforge.figures import figure

    f, (a, b) = figure(11, 4, ncols=2)
    n = len(fig["_bins"]["train"])
    x = np.arange(n)
    a.bar(x - 0.2, fig["_bins"]["train"], width=0.4, label="training data")
    a.bar(x + 0.2, fig["_bins"]["traffic"], width=0.4, label="recent prompts")
    a.set_xlabel("token bin (by training frequency, equal training mass)")
    a.set_ylabel("share of tokens")
    a.set_title(f"input drift: PSI {fig['psi']:.3f}, JS {fig['js']:.3f}")
    a.legend()
    if fig["_latency"]:
        b.hist(fig["_latency"], bins=30)
        for q, name in ((fig["latency_p50_ms"], "P50"), (fig["latency_p99_ms"], "P99")):
            b.axvline(q, color="k", ls="--")
            b.text(q, b.get_ylim()[1] * 0.9, f" {name} {q:.0f} ms")
    b.set_xlabel("latency (ms)")
    b.set_title("latency of recent requests")
    f.tight_layout()
    f.savefig(out)


def notify(webhook: str, payload: dict) -> None:
    """POST the alerts as JSON to a loopback URL (nothing leaves the machine)."""
    import urllib.parse
    import urllib.request

    from homeforge.serve.net import is_loopback

    u = urllib.parse.urlparse(webhook)
    if u.scheme not in ("http", "https") or not is_loopback(u.hostname):
        raise HomeforgeError(f"webhook {webhook} is not a loopback URL", where="--webhook",
                             fix="use http://127.0.0.1:PORT/PATH (a local relay can forward it further)")
    req = urllib.request.Request(webhook, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


def run(feedback: Path, model_dir: Path, data: Path, out: Path, thresholds: MonitorThresholds, *,
        last: int | None = None, since_hours: float | None = None, embeddings: bool = False,
        webhook: str | None = None, n_bins: int = 20) -> dict:
    """Compute, write the report, and raise ``DriftAlert`` (exit 4) when a figure is past its threshold."""
    from homeforge._fs import atomic_write_text
    from homeforge.security.audit import AuditLog

    ex = traffic(feedback, last, since_hours)
    fig = compute(ex, model_dir, data, last=last, n_bins=n_bins, embeddings=embeddings)
    found = alerts(fig, thresholds)
    out.mkdir(parents=True, exist_ok=True)
    plot(fig, out / "drift.png")
    public = {k: v for k, v in fig.items() if not k.startswith("_")}
    report = {"model": str(model_dir), "data": str(data), "feedback": str(feedback), "time": time.time(),
              "figures": public, "thresholds": thresholds.model_dump(), "alerts": found}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "metrics.prom", prometheus(fig, len(found)))
    md = ["# homeforge monitor", "", f"model `{model_dir}`, training data `{data}`, {fig['exchanges']} recent exchanges",
          "", "| figure | value |", "|---|---:|"]
    md += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in public.items()
           if not isinstance(v, dict)]
    md += ["", "## alerts", "", *([f"- {a}" for a in found] or ["none"]), "", "![drift](drift.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    AuditLog().append({"event": "monitor", "model": str(model_dir), "alerts": found,
                       **{k: public.get(k) for k in ("psi", "js", "ppl_ratio", "latency_p99_ms", "exchanges")}})
    if found and webhook:
        notify(webhook, {"source": "homeforge monitor", "alerts": found, "report": str(out / "report.json")})
    report["out"] = str(out)
    return report

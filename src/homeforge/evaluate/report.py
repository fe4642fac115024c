"""The evaluation report: PNG plots, eval.md, headline metrics and a console summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from homeforge.figures import figure


def write(out: Path, result: dict) -> list[str]:
    """Plots into ``out``: length_vs_loss.png (LMs), confusion_matrix.png (classifiers)."""
    written = []
    m, b = result["model"], result.get("baseline")
    if "doc_loss" in m["per_example"]:
        fig, ax = figure(7, 4)
        for res, name, colour in ((m, "model", "C0"), (b, "baseline", "C1")):
            if res is None:
                continue
            n = np.asarray(res["per_example"]["doc_tokens"])
            loss = np.asarray(res["per_example"]["doc_loss"])
            keep = n > 0
            ax.scatter(n[keep], loss[keep], s=10, alpha=0.5, color=colour, label=f"{name} (ppl {res['perplexity']['ppl']:.2f})")
        ax.set_xscale("log")
        ax.set_xlabel("document length (scored tokens)")
        ax.set_ylabel("mean loss (nats/token)")
        ax.set_title("length vs loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "length_vs_loss.png")
        written.append("length_vs_loss.png")
    if "classification" in m:
        c = m["classification"]
        cm = np.asarray(c["confusion_matrix"], dtype=float)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        k = len(c["labels"])
        fig, ax = figure(1.2 + 0.6 * k, 1 + 0.6 * k)
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(k), c["labels"], rotation=45, ha="right")
        ax.set_yticks(range(k), c["labels"])
        for i in range(k):
            for j in range(k):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black",
                        fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"accuracy {c['accuracy']:.3f}, macro-F1 {c['macro_f1']:.3f}")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(out / "confusion_matrix.png")
        written.append("confusion_matrix.png")
    return written


def headline(result: dict) -> dict:
    m = result["model"]
    h: dict = {"kind": m["kind"], "examples": m["n_examples"]}
    if "perplexity" in m:
        h["ppl"] = m["perplexity"]["ppl"]
        h["bits_per_byte"] = m["perplexity"].get("bits_per_byte")
    if "generation" in m and "bleu" in m["generation"]:
        h.update(bleu=m["generation"]["bleu"], rouge_l=m["generation"]["rouge_l"], exact_match=m["generation"]["exact_match"])
    if "speed" in m:
        h["tokens_per_s"] = m["speed"]["tokens_per_s"]
    if "classification" in m:
        h.update(accuracy=m["classification"]["accuracy"], macro_f1=m["classification"]["macro_f1"],
                 auc_pr=m["classification"].get("auc_pr"))
    return h


def _f(v, fmt=".4f"):
    return "-" if v is None else (f"{v:{fmt}}" if isinstance(v, (int, float)) else str(v))


def _rows(result: dict) -> list[tuple[str, str, str]]:
    """(metric, model, baseline) rows."""
    m, b = result["model"], result.get("baseline") or {}
    rows = []

    def add(name, path, fmt=".4f"):
        def get(r):
            for p in path:
                if not isinstance(r, dict) or p not in r:
                    return None
                r = r[p]
            return r
        if get(m) is not None:
            rows.append((name, _f(get(m), fmt), _f(get(b), fmt) if b else ""))

    add("perplexity", ["perplexity", "ppl"])
    add("loss (nats/token)", ["perplexity", "loss"])
    add("bits per byte", ["perplexity", "bits_per_byte"])
    add("scored tokens", ["perplexity", "tokens"], "d")
    add("BLEU", ["generation", "bleu"], ".2f")
    add("ROUGE-L F", ["generation", "rouge_l"])
    add("exact match", ["generation", "exact_match"])
    add("generation tokens/s", ["speed", "tokens_per_s"], ".1f")
    add("latency p50 (ms)", ["speed", "latency_ms_p50"], ".1f")
    add("latency p95 (ms)", ["speed", "latency_ms_p95"], ".1f")
    add("accuracy", ["classification", "accuracy"])
    add("macro-F1", ["classification", "macro_f1"])
    add("AUC-PR (macro)", ["classification", "auc_pr"])
    add("confusion entropy H(pred|true) bits", ["classification", "confusion_entropy", "conditional_bits"])
    for pk in ("char", "word"):
        add(f"robustness {pk}: ppl", ["robustness", pk, "ppl"])
        add(f"robustness {pk}: ppl / clean ppl", ["robustness", pk, "ppl_ratio"])
        add(f"robustness {pk}: ROUGE-L F", ["robustness", pk, "generation", "rouge_l"])
        add(f"robustness {pk}: BLEU", ["robustness", pk, "generation", "bleu"], ".2f")
        add(f"robustness {pk}: accuracy", ["robustness", pk, "accuracy"])
    return rows


def markdown(result: dict) -> str:
    m, b = result["model"], result.get("baseline")
    lines = [f"# Evaluation of `{m['model']}`", "",
             f"Dataset `{m['dataset']}` (kind {m['kind']}), split `{m['split']}`, {m['n_examples']} examples."]
    if "context" in m:
        lines.append(f"Perplexity: sliding window of {m['context']} tokens, stride {m['stride']}.")
    if b:
        lines.append(f"Baseline: `{b['model']}`.")
    lines += ["", "| metric | model |" + (" baseline |" if b else ""), "| --- | --- |" + (" --- |" if b else "")]
    for name, mv, bv in _rows(result):
        lines.append(f"| {name} | {mv} |" + (f" {bv} |" if b else ""))
    if "classification" in m:
        c = m["classification"]
        lines += ["", "## Per class", "", "| class | precision | recall | F1 | AUC-PR | support |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, pc in c["per_class"].items():
            lines.append(f"| {name} | {pc['precision']:.3f} | {pc['recall']:.3f} | {pc['f1']:.3f} | "
                         f"{_f(pc.get('auc_pr'), '.3f')} | {pc['support']} |")
        lines += ["", "![confusion matrix](confusion_matrix.png)"]
    if "perplexity" in m:
        lines += ["", "![length vs loss](length_vs_loss.png)"]
    comp = result.get("comparison")
    if comp:
        lines += ["", "## Model vs baseline (paired tests)", "", "| metric | test | delta | 95% CI | p-value | effect size |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, t in comp.items():
            ci = f"[{t['ci95'][0]:+.4f}, {t['ci95'][1]:+.4f}]" if "ci95" in t else "-"
            lines.append(f"| {name} | {t['test']} | {t['delta']:+.4f} | {ci} | {t['p_value']:.4g} | "
                         f"{t['effect_size']:.3f} ({t['effect_size_name']}) |")
    if result.get("gates"):
        lines += ["", "## Gates", ""]
        for g in result["gates"]:
            lines.append(f"- {'PASS' if g['passed'] else 'FAIL'} `{g['gate']}`: {g['detail']}")
    samples = (m.get("generation") or {}).get("samples")
    if samples:
        lines += ["", "## Sample generations", ""]
        for s in samples[:3]:
            lines += [f"- reference: `{s['reference'][:200]!r}`", f"  prediction: `{s['prediction'][:200]!r}`"]
    return "\n".join(lines) + "\n"


def print_summary(result: dict, console: Console) -> None:
    b = result.get("baseline")
    table = Table(title="evaluation")
    table.add_column("metric")
    table.add_column("model", justify="right")
    if b:
        table.add_column("baseline", justify="right")
    for name, mv, bv in _rows(result):
        table.add_row(name, mv, *([bv] if b else []))
    console.print(table)
    for name, t in (result.get("comparison") or {}).items():
        console.print(f"{name}: delta {t['delta']:+.4f}, p = {t['p_value']:.4g} ({t['test']}), "
                      f"effect size {t['effect_size']:.3f} ({t['effect_size_name']})")
    for g in result.get("gates") or []:
        colour = "green" if g["passed"] else "red"
        console.print(f"[{colour}]{'PASS' if g['passed'] else 'FAIL'}[/] {g['gate']}: {g['detail']}")

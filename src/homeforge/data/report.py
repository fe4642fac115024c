"""The quality report of `homeforge prepare`: report.json, report.md and PNG plots.

Holds counts (records in/out, dropped by reason, duplicates, PII by type over every record
read, label balance per split and per class, lengths, correlated columns), names of bad
files/lines, and a few examples per drop reason (source, measured value and, unless the
dataset is encrypted, an excerpt cut after PII scrubbing: never a detected PII value).
Every dropped record is listed in drops.jsonl (``data/drops.py``). The report contains no
timings, so the same inputs give byte-identical reports (and dataset hashes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from homeforge.errors import HomeforgeError

SPLITS = ("train", "val", "test")


def _length_stats(a: np.ndarray) -> dict:
    if len(a) == 0:
        return {"n": 0}
    q = np.percentile(a, [5, 50, 95])
    return {"n": int(len(a)), "min": int(a.min()), "p5": float(q[0]), "median": float(q[1]), "mean": round(float(a.mean()), 2),
            "p95": float(q[2]), "max": int(a.max()), "total": int(a.sum())}


def build_report(cfg, files, builtins, issues, s1: dict, s2: dict, droplog, with_text: bool = True) -> dict:
    drops: dict[str, int] = {}
    for src in (issues.lines, s1["drops"]):
        for k, v in src.items():
            drops[k] = drops.get(k, 0) + int(v)
    if s2["dups"].get("exact"):
        drops["exact_duplicate"] = int(s2["dups"]["exact"])
    if s2["dups"].get("near"):
        drops["near_duplicate"] = int(s2["dups"]["near"])
    n_in = int(s1["read"]) + sum(issues.lines.values())
    n_out = int(sum(s2["counts"].values()))
    n_dedup_in = int(s1["n"])
    n_dups = int(sum(s2["dups"].values()))
    report: dict = {
        "kind": cfg.kind,
        "inputs": {"files": len(files), "builtins": list(builtins), "bytes": int(sum(_size(p) for p in files)),
                   "formats": s1["formats"], "files_skipped": dict(sorted(issues.files.items()))},
        "records": {"in": n_in, "out": n_out, "dropped": dict(sorted(drops.items())),
                    "splits": {s: int(s2["counts"][s]) for s in SPLITS}},
        "problems": issues.named,
        "problems_total": int(sum(issues.files.values()) + sum(issues.lines.values())),
        "dedup": {"exact": bool(cfg.dedup.exact), "near": bool(cfg.dedup.near), "threshold": cfg.dedup.threshold,
                  "checked": n_dedup_in, "exact_duplicates": int(s2["dups"].get("exact", 0)),
                  "near_duplicates": int(s2["dups"].get("near", 0)), "clusters": s2["clusters"],
                  "duplicate_rate": round(n_dups / n_dedup_in, 6) if n_dedup_in else 0.0,
                  "details": "drops.jsonl"},
        "drops": droplog.summary(with_text),
        "pii": {"enabled": bool(cfg.pii.enabled), "mode": cfg.pii.mode, "scope": "every record read, kept or dropped",
                "counts": dict(sorted((k, int(v)) for k, v in s1["pii"].items()))},
        "lengths": {"chars": {s: _length_stats(s2["chars"][s]) for s in SPLITS if s2["counts"][s]}},
        "tabular": {name: pairs for name, pairs in s1["tables"].items() if pairs},
        "warnings": [],
    }
    report["_hist"] = {"chars": {s: s2["chars"][s] for s in SPLITS if s2["counts"][s]}}
    if issues.files:
        report["warnings"].append(f"{sum(issues.files.values())} input file(s) skipped: "
                                  + ", ".join(f"{k} {v}" for k, v in sorted(issues.files.items())) + " (see problems)")
    if cfg.kind == "classification":
        _labels(cfg, report, s1, s2, droplog, with_text)
    for name, pairs in report["tabular"].items():
        for p in pairs:
            report["warnings"].append(f"{name}: columns {p['a']!r} and {p['b']!r} are highly correlated (r={p['r']})")
    return report


def _labels(cfg, report: dict, s1: dict, s2: dict, droplog, with_text: bool) -> None:
    """Label balance per split, what each class lost and why, duplicates whose copies disagree on the label."""
    total = Counter_sum(s2["labels"])
    names = sorted(total)
    n = sum(total.values())
    lab: dict = {"names": names, "counts": {k: int(total[k]) for k in names},
                 "by_split": {s: dict(sorted(s2["labels"][s].items())) for s in SPLITS if s2["counts"][s]}}
    warn = report["warnings"]
    for k in names:
        if n and total[k] / n < cfg.report.min_class_fraction:
            warn.append(f"class {k!r} has only {total[k]} of {n} records "
                        f"({total[k] / n:.1%} < report.min_class_fraction={cfg.report.min_class_fraction})")
    by_class = {}
    for k in sorted(set(s1["labels_in"]) | set(total)):
        read = int(s1["labels_in"].get(k, 0))
        dropped = {r: int(v) for r, v in sorted(droplog.by_class.get(k, {}).items())}
        lost = sum(dropped.values())
        by_class[k] = {"read": read, "kept": int(total.get(k, 0)), "dropped": dropped,
                       "lost_fraction": round(lost / read, 4) if read else 0.0}
        if read and total.get(k, 0) == 0:
            warn.append(f"class {k!r} lost all its {read} records ({_reasons(dropped)}): it is not in the dataset")
        elif read and lost / read > cfg.report.max_class_loss:
            warn.append(f"class {k!r} lost {lost} of its {read} records ({lost / read:.0%} > report.max_class_loss="
                        f"{cfg.report.max_class_loss}; {_reasons(dropped)})")
    lab["by_class"] = by_class
    conf = droplog.conflicting_labels(with_text)
    lab["conflicting_duplicates"] = conf
    if conf["count"]:
        pairs = ", ".join(f"{p['count']}x {p['dropped']!r} dropped for a copy labelled {p['kept']!r}" for p in conf["pairs"][:4])
        warn.append(f"{conf['count']} duplicate record(s) carried another label than the copy kept ({pairs}); "
                    "see report.md 'Labels' and drops.jsonl")
    report["labels"] = lab


def _reasons(dropped: dict) -> str:
    return ", ".join(f"{r} {v}" for r, v in sorted(dropped.items(), key=lambda kv: -kv[1])) or "no drops"


def Counter_sum(counters: dict) -> dict:  # noqa: N802
    out: dict = {}
    for c in counters.values():
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def check_labels(cfg, report: dict) -> None:
    names = report.get("labels", {}).get("names", [])
    if len(names) < 2:
        raise HomeforgeError(
            f"the label field {cfg.fields.label!r} has {len(names)} class{'es' if len(names) != 1 else ''}"
            + (f" ({names[0]!r})" if names else "") + "; classification needs at least two",
            where=", ".join(cfg.inputs),
            fix="check fields.label names the label column, or use kind=text for unlabelled data",
        )


def add_tokens(report: dict, tokens: dict, vocab_size: int, from_dir: str | None) -> None:
    report["tokenizer"] = {"vocab_size": int(vocab_size), "source": from_dir or "trained byte-level BPE"}
    report["lengths"]["tokens"] = {s: _length_stats(a) for s, a in tokens.items()}
    report["_hist"]["tokens"] = tokens


def manifest_metrics(report: dict) -> dict:
    r = report["records"]
    return {"records_in": r["in"], "records_out": r["out"], "splits": r["splits"], "dropped": r["dropped"],
            "duplicates": {"exact": report["dedup"]["exact_duplicates"], "near": report["dedup"]["near_duplicates"],
                           "clusters": report["dedup"]["clusters"]},
            "pii": report["pii"]["counts"], "files_skipped": report["inputs"]["files_skipped"],
            "tokens": {s: v.get("total", 0) for s, v in report["lengths"].get("tokens", {}).items()},
            "vocab_size": report.get("tokenizer", {}).get("vocab_size")}


def public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def render_markdown(report: dict) -> str:
    r = report["records"]
    lines = [f"# Dataset report ({report['kind']})", ""]
    inp = report["inputs"]
    fmts = ", ".join(f"{k} {v}" for k, v in sorted(inp["formats"].items())) or "none"
    lines += [f"Inputs: {inp['files']} files ({inp['bytes']:,} bytes; {fmts})"
              + (f", builtin: {', '.join(inp['builtins'])}" if inp["builtins"] else ""), ""]
    lines += ["## Records", "", "| | count |", "|---|---:|", f"| in | {r['in']:,} |"]
    for k, v in r["dropped"].items():
        lines.append(f"| dropped: {k} | {v:,} |")
    lines.append(f"| **out** | **{r['out']:,}** |")
    for s, v in r["splits"].items():
        if v:
            lines.append(f"| split {s} | {v:,} |")
    if report.get("augmented"):
        lines.append(f"| augmented copies added to train | {report['augmented']:,} |")
    lines.append("")
    if inp["files_skipped"]:
        lines += ["Files skipped: " + ", ".join(f"{k} {v}" for k, v in inp["files_skipped"].items()), ""]
    d = report["dedup"]
    lines += ["## Duplicates", "",
              f"{d['exact_duplicates']:,} exact and {d['near_duplicates']:,} near duplicates (MinHash LSH, Jaccard >= "
              f"{d['threshold']}) among {d['checked']:,} records: {d['clusters']:,} clusters, duplicate rate "
              f"{d['duplicate_rate']:.2%}. The first copy of each cluster is kept; {d['details']} lists every dropped "
              "record with the one kept instead.", ""]
    lines += _drops_md(report)
    p = report["pii"]
    lines += ["## Personal data", ""]
    if not p["enabled"]:
        lines += ["PII scrubbing is off.", ""]
    elif p["counts"]:
        lines += [f"Replaced ({p['mode']}), counted over every record read (kept or dropped):", "", "| type | count |",
                  "|---|---:|"]
        lines += [f"| {k} | {v:,} |" for k, v in p["counts"].items()] + [""]
    else:
        lines += ["None found.", ""]
    lines += ["## Lengths", "", "| split | unit | n | min | median | mean | p95 | max |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for unit, per in report["lengths"].items():
        for s, st in per.items():
            if st.get("n"):
                lines.append(f"| {s} | {unit} | {st['n']:,} | {st['min']:,} | {st['median']:,.0f} | {st['mean']:,.1f} | "
                             f"{st['p95']:,.0f} | {st['max']:,} |")
    lines += ["", "![lengths](lengths.png)", ""]
    if "labels" in report:
        lab = report["labels"]
        lines += _labels_md(lab)
    if report["tabular"]:
        lines += ["## Correlated columns", "", "| file | column a | column b | r |", "|---|---|---|---:|"]
        for name, pairs in report["tabular"].items():
            lines += [f"| {name} | {q['a']} | {q['b']} | {q['r']} |" for q in pairs]
        lines.append("")
    if report.get("tokenizer"):
        lines += [f"Tokenizer: {report['tokenizer']['source']}, vocabulary {report['tokenizer']['vocab_size']:,}.", ""]
    if report["problems"]:
        lines += [f"## Problems ({report['problems_total']})", "", "| reason | file | line | detail |", "|---|---|---:|---|"]
        for q in report["problems"]:
            lines.append(f"| {q['reason']} | {q['file']} | {q['line'] if q['line'] is not None else ''} | "
                         f"{q['detail'].replace('|', '/')} |")
        if report["problems_total"] > len(report["problems"]):
            lines.append(f"| ... | {report['problems_total'] - len(report['problems'])} more | | |")
        lines.append("")
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    return "\n".join(lines)


def _cell(x) -> str:
    return str(x).replace("|", "/").replace("\n", " ")


def _drops_md(report: dict) -> list[str]:
    d = report["drops"]
    if not d["examples"]:
        return []
    out = ["## Dropped records", "",
           f"Every dropped record ({d['records']:,}) is listed in {d['file']} with its source, reason and measured "
           f"value. A few per reason (excerpts {d['excerpts']}):", "",
           "| reason | source | measured | excerpt |", "|---|---|---|---|"]
    for reason, ex in d["examples"].items():
        for e in ex:
            out.append(f"| {reason} | {_cell(e['source'])} | {_cell(e.get('detail', ''))} | {_cell(e.get('text', ''))} |")
    return out + [""]


def _labels_md(lab: dict) -> list[str]:
    splits = list(lab["by_split"])
    out = ["## Labels", "", "| label | " + " | ".join(splits) + " | total | read | lost | lost to |",
           "|---|" + "---:|" * (len(splits) + 3) + "---|"]
    for k, c in lab["by_class"].items():
        per = " | ".join(f"{lab['by_split'][s].get(k, 0):,}" for s in splits)
        out.append(f"| {_cell(k)} | {per} | {c['kept']:,} | {c['read']:,} | {c['lost_fraction']:.1%} | "
                   f"{_cell(_reasons(c['dropped']))} |")
    out += ["", "![labels](labels.png)", ""]
    conf = lab["conflicting_duplicates"]
    if conf["count"]:
        out += [f"Duplicates whose copies carry different labels: {conf['count']:,} (the first copy is kept with its "
                "label; the others are dropped).", "", "| kept label | dropped label | count |", "|---|---|---:|"]
        out += [f"| {_cell(p['kept'])} | {_cell(p['dropped'])} | {p['count']:,} |" for p in conf["pairs"]]
        out += ["", "| dropped | label | kept | label | excerpt |", "|---|---|---|---|---|"]
        out += [f"| {_cell(e['source'])} | {_cell(e['label'])} | {_cell(e['kept'])} | {_cell(e['kept_label'])} | "
                f"{_cell(e.get('text', ''))} |" for e in conf["examples"]]
        out.append("")
    return out


def _plots(report: dict, dest: Path) -> None:
    from homeforge.figures import figure

    hist = report["_hist"]
    units = [u for u in ("chars", "tokens") if hist.get(u)]
    fig, axes = figure(5 * len(units), 3.5, ncols=len(units))
    for ax, unit in zip(axes if len(units) > 1 else [axes], units, strict=False):
        allv = np.concatenate([a for a in hist[unit].values() if len(a)] or [np.ones(1)])
        bins = np.logspace(0, np.log10(max(10, allv.max() + 1)), 40)
        for s, a in hist[unit].items():
            if len(a):
                ax.hist(np.maximum(a, 1), bins=bins, alpha=0.6, label=f"{s} ({len(a):,})")
        ax.set_xscale("log")
        ax.set_xlabel(f"{unit} per record")
        ax.set_ylabel("records")
        ax.legend()
    fig.suptitle("record lengths")
    fig.tight_layout()
    fig.savefig(dest / "lengths.png", dpi=90, metadata={"Software": None})
    if "labels" in report:
        counts = report["labels"]["counts"]
        fig, ax = figure(max(4, 0.5 * len(counts) + 2), 3.5)
        ax.bar(list(counts), list(counts.values()), color="tab:blue")
        ax.set_ylabel("records")
        ax.set_title("label balance")
        for tick in ax.get_xticklabels():
            tick.set_rotation(45)
            tick.set_horizontalalignment("right")
        fig.tight_layout()
        fig.savefig(dest / "labels.png", dpi=90, metadata={"Software": None})


def write_report(report: dict, dest: Path) -> None:
    (dest / "report.json").write_text(json.dumps(public(report), indent=2, ensure_ascii=False), encoding="utf-8")
    (dest / "report.md").write_text(render_markdown(report), encoding="utf-8")
    _plots(report, dest)

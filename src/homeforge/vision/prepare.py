"""``homeforge prepare --kind image-classification``: images -> a checked, private, split dataset.

Inputs: one folder with a sub-folder per class (``DATA/cat/*.jpg``, ``DATA/dog/*.png``), or
CSV/JSONL listings with an image path, a label and optionally a text per record (fields
``fields.image``, ``fields.label``, ``fields.text``; relative paths are read from the listing's
folder). Each image is decoded in full (a corrupt or truncated file is dropped and named in
``drops.jsonl`` and the report, like a bad text line), turned upright by its EXIF orientation
and rebuilt from its pixels, so no EXIF/GPS block, ICC profile or text chunk reaches the
dataset. Exact duplicates (same pixels) and near-duplicates (pHash within
``image.phash_distance`` bits) are dropped, the kept copy named. The split is by content hash
(``split.*``), so an image lands in the same split on every run.

The artifact::

    labels.json                  class names (index = label id)
    {train,val,test}.jsonl       {"image": "images/train/000000.png", "label": 3, "text": ..., "source": ...}
    images/{split}/              the cleaned images (original size, no metadata)
    {split}-00000.npy ...        uint8 [n, size, size, 3] training copies, ``image.shard_size`` per shard
    {split}.labels.npy           int64 labels in shard order
    report.json, report.md       counts, drops, size/aspect statistics, class balance
    thumbnails.png               a row of thumbnails per class
    drops.jsonl                  every image not kept, with its reason
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from homeforge import artifacts
from homeforge.data.drops import DropLog
from homeforge.data.prepare import split_of
from homeforge.errors import HomeforgeError
from homeforge.vision import images as im

EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")


def _records(cfg) -> Iterator[tuple[str, Path | None, str, str | None]]:
    """(source name, image path or None when missing, label, text) for every input record."""
    f = cfg.fields
    for inp in cfg.inputs:
        p = Path(inp).expanduser()
        if p.is_dir():
            classes = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
            if not classes:
                raise HomeforgeError(f"{p} has no class sub-folders", where=str(p),
                                     fix="put each class's images in a folder named after the class, or pass a CSV/JSONL "
                                         "listing (image path + label)")
            for d in classes:
                for q in sorted(d.rglob("*")):
                    if q.is_file() and q.suffix.lower() in EXTS:
                        yield f"{d.name}/{q.relative_to(d)}", q, d.name, None
        elif p.suffix.lower() in (".csv", ".jsonl"):
            yield from _listing(p, f)
        elif p.exists():
            raise HomeforgeError(f"{p} is neither a folder of class folders nor a .csv/.jsonl listing", where=str(p),
                                 fix="pass DATA_DIR (one sub-folder per class) or a CSV/JSONL of image paths and labels")
        else:
            raise HomeforgeError(f"input {p} does not exist", fix="check the path")


def _listing(p: Path, f) -> Iterator[tuple[str, Path | None, str, str | None]]:
    with open(p, encoding="utf-8", newline="") as fh:
        rows = csv.DictReader(fh) if p.suffix.lower() == ".csv" else (json.loads(line) for line in fh if line.strip())
        for n, row in enumerate(rows, 2 if p.suffix.lower() == ".csv" else 1):
            where = f"{p.name}:{n}"
            if f.image not in row or f.label not in row or row[f.label] in (None, ""):
                raise HomeforgeError(f"record {where} has no {f.image!r} or {f.label!r} field", where=str(p),
                                     fix=f"name the columns with fields.image=... fields.label=... (it has: "
                                         f"{', '.join(row)})")
            q = Path(str(row[f.image])).expanduser()
            q = q if q.is_absolute() else p.parent / q
            text = row.get(f.text)
            yield where, (q if q.is_file() else None), str(row[f.label]), (str(text) if text is not None else None)


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"min": float(a.min()), "p50": float(np.median(a)), "mean": round(float(a.mean()), 3), "max": float(a.max())}


def _plan(cfg, output):
    conf = {"kind": cfg.kind, "fields": cfg.fields.model_dump(), "image": cfg.image.model_dump(),
            "split": cfg.split.model_dump(), "report": cfg.report.model_dump()}
    inputs = {f"input{i}": p for i, p in enumerate(cfg.inputs)}
    return artifacts.plan(Path(output or cfg.output_dir).expanduser(), stage="prepare", config=conf, inputs=inputs,
                          force=False)


def run(cfg, *, force: bool = False, check_only: bool = False, console=None, output=None) -> dict:
    """Build the image dataset artifact; returns {"out", "report", "skipped"}."""
    import tempfile

    from rich.console import Console

    console = console or Console()
    if not cfg.inputs:
        raise HomeforgeError("no inputs", fix="homeforge prepare DATA_DIR --kind image-classification -o OUT")
    if cfg.encrypt:
        raise HomeforgeError("encrypted image datasets are not supported yet", fix="prepare without --encrypt")
    plan = _plan(cfg, output)
    plan.force = force
    if not check_only and plan.up_to_date:
        console.print(f"[green]dataset up to date[/] {plan.out} (same inputs and config; --force rebuilds)")
        return {"out": plan.out, "report": json.loads((plan.out / "report.json").read_text()), "skipped": True}
    if check_only:
        with tempfile.TemporaryDirectory(prefix="homeforge-check-") as d:
            report = _build(cfg, Path(d), console)
        console.print(render_markdown(report), markup=False, highlight=False)
        return {"out": None, "report": report, "skipped": False}
    with plan.write() as art:
        report = _build(cfg, art.dir, console)
        art.metrics = {"records": report["records"]["out"], "classes": len(report["labels"]["names"]),
                       "dropped": sum(report["records"]["dropped"].values())}
        art.extra["kind"] = cfg.kind
    r = report["records"]
    console.print(f"[green]dataset[/] {plan.out}: {r['in']:,} images in, {r['out']:,} out "
                  f"({', '.join(f'{k} {v:,}' for k, v in r['splits'].items() if v)}); "
                  f"{sum(r['dropped'].values()):,} dropped; report: {plan.out / 'report.md'}", highlight=False)
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    return {"out": plan.out, "report": report, "skipped": False}


def _build(cfg, dest: Path, console) -> dict:
    work = dest / ".work"
    work.mkdir(parents=True, exist_ok=True)
    drops = DropLog(work)
    ic, sp = cfg.image, cfg.split
    widths, heights, aspects, formats = [], [], [], Counter()
    hashes = np.zeros(0, dtype=np.uint64)
    kept_src: list[tuple[str, str]] = []
    exact: dict[str, int] = {}
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    arrays: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    thumbs: dict[str, list] = {}
    n_in = 0
    bad: list[dict] = []  # images that do not decode, named in the report (up to report.max_named_errors)
    records = list(_records(cfg))
    labels = sorted({r[2] for r in records})
    index = {name: i for i, name in enumerate(labels)}
    with console.status("decoding images") as status:
        for source, path, label, text in records:
            n_in += 1
            if n_in % 200 == 0:
                status.update(f"decoding images ({n_in:,}/{len(records):,})")
            if path is None:
                bad.append({"stage": "ingest", "source": source, "reason": "missing_image", "label": label,
                            "detail": "the listed image file does not exist"})
                drops.add(bad[-1])
                continue
            try:
                img = im.decode(path)
            except im.BadImage as exc:
                bad.append({"stage": "ingest", "source": source, "reason": exc.reason, "label": label,
                            "detail": str(exc)})
                drops.add(bad[-1])
                continue
            formats[getattr(img, "format_hint", None) or "?"] += 1
            widths.append(img.width)
            heights.append(img.height)
            aspects.append(round(img.width / img.height, 4))
            digest = hashlib.sha256(img.tobytes() + f"{img.size}".encode()).hexdigest()
            if digest in exact:
                k = exact[digest]
                drops.add({"stage": "dedup", "source": source, "reason": "exact_duplicate", "label": label,
                           "kept": kept_src[k][0], "kept_label": kept_src[k][1], "value": 0})
                continue
            h = im.phash(img)
            if cfg.image.near_dedup and len(hashes):
                dist = im.hamming_to_all(h, hashes)
                k = int(dist.argmin())
                if int(dist[k]) <= ic.phash_distance:
                    drops.add({"stage": "dedup", "source": source, "reason": "near_duplicate", "label": label,
                               "kept": kept_src[k][0], "kept_label": kept_src[k][1], "value": int(dist[k]),
                               "limit": ic.phash_distance, "detail": f"pHash distance {int(dist[k])} <= "
                                                                     f"{ic.phash_distance}"})
                    continue
            exact[digest] = len(kept_src)
            kept_src.append((source, label))
            hashes = np.append(hashes, np.uint64(h))
            split = split_of(digest, sp.val, sp.test, sp.salt)
            rel = Path("images") / split / f"{len(rows[split]):06d}"
            rel = rel.with_suffix(".jpg" if getattr(img, "format_hint", None) == "JPEG" else ".png")
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            im.save_clean(img, dest / rel)
            row = {"image": rel.as_posix(), "label": index[label], "source": source}
            if text is not None:
                row["text"] = text
            rows[split].append(row)
            arrays[split].append(im.to_array(img, ic.size))
            t = thumbs.setdefault(label, [])
            if len(t) < ic.thumbnails:
                t.append(img)
    drops.finish(dest)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    if not rows["train"]:
        raise HomeforgeError(f"no training images survived ({n_in} read, {dict(drops.counts) or 'none'} dropped)",
                             where=", ".join(cfg.inputs), fix="see drops.jsonl; check the paths and files")
    for s in SPLITS:
        with open(dest / f"{s}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[s])
        a = np.stack(arrays[s]) if arrays[s] else np.zeros((0, ic.size, ic.size, 3), np.uint8)
        for k in range(max(1, -(-len(a) // ic.shard_size))):
            np.save(dest / f"{s}-{k:05d}.npy", a[k * ic.shard_size:(k + 1) * ic.shard_size])
        np.save(dest / f"{s}.labels.npy", np.asarray([r["label"] for r in rows[s]], dtype=np.int64))
    (dest / "labels.json").write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")
    if thumbs:
        im.thumbnail_grid({k: thumbs[k] for k in labels if k in thumbs}, dest / "thumbnails.png")
    report = _report(cfg, labels, rows, drops, n_in, widths, heights, aspects, formats)
    report["bad_images"] = {"count": len(bad), "named": [{k: e[k] for k in ("source", "reason", "detail")}
                                                         for e in bad[:cfg.report.max_named_errors]]}
    (dest / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (dest / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def _report(cfg, labels, rows, drops, n_in, widths, heights, aspects, formats) -> dict:
    per_class = Counter(r["label"] for s in SPLITS for r in rows[s])
    out = sum(per_class.values())
    dropped_by_class = {k: dict(v) for k, v in drops.by_class.items()}
    warnings = []
    for i, name in enumerate(labels):
        if out and per_class[i] / out < cfg.report.min_class_fraction:
            warnings.append(f"class {name!r} has {per_class[i]} images ({per_class[i] / out:.1%} of the kept ones)")
    if len(labels) < 2:
        warnings.append("fewer than two classes: nothing to classify")
    conflicts = drops.conflicting_labels(True)
    if conflicts["count"]:
        warnings.append(f"{conflicts['count']} duplicates carry another label than the copy kept (see the report)")
    return {
        "kind": "image-classification",
        "records": {"in": n_in, "out": out, "splits": {s: len(rows[s]) for s in SPLITS},
                    "dropped": dict(sorted(drops.counts.items()))},
        "labels": {"names": labels, "counts": {labels[i]: per_class[i] for i in range(len(labels))},
                   "dropped": dropped_by_class},
        "images": {"width": _stats(widths), "height": _stats(heights), "aspect": _stats(aspects),
                   "formats": dict(formats), "shard_size_px": cfg.image.size,
                   "metadata": "stripped (EXIF incl. GPS, ICC, XMP, text chunks): images rebuilt from pixels"},
        "drops": drops.summary(True),
        "conflicting_labels": conflicts,
        "warnings": warnings,
    }


def render_markdown(report: dict) -> str:
    r, img = report["records"], report["images"]
    lines = ["# Image dataset report", "",
             f"- images read: {r['in']:,}; kept: {r['out']:,} ("
             + ", ".join(f"{k} {v:,}" for k, v in r["splits"].items()) + ")",
             f"- dropped: {sum(r['dropped'].values()):,}"
             + (" (" + ", ".join(f"{k} {v}" for k, v in r["dropped"].items()) + ")" if r["dropped"] else ""),
             f"- metadata: {img['metadata']}", "", "## Sizes", "", "| | min | median | mean | max |", "|---|---|---|---|---|"]
    for k in ("width", "height", "aspect"):
        s = img[k]
        if s:
            lines.append(f"| {k} | {s['min']:g} | {s['p50']:g} | {s['mean']:g} | {s['max']:g} |")
    lines += ["", f"formats: {', '.join(f'{k} {v}' for k, v in img['formats'].items())}", "", "## Classes", "",
              "| class | kept | dropped |", "|---|---|---|"]
    for name, n in report["labels"]["counts"].items():
        d = report["labels"]["dropped"].get(name, {})
        lines.append(f"| {name} | {n} | {', '.join(f'{k} {v}' for k, v in d.items()) or '-'} |")
    lines += ["", "![thumbnails per class](thumbnails.png)", ""]
    bad = report.get("bad_images", {})
    if bad.get("named"):
        lines += [f"## Images that do not decode ({bad['count']})", ""]
        lines += [f"- `{e['source']}`: {e['reason']} ({e['detail']})" for e in bad["named"]]
        if bad["count"] > len(bad["named"]):
            lines.append(f"- ... and {bad['count'] - len(bad['named'])} more (drops.jsonl)")
        lines.append("")
    ex = report["drops"]["examples"]
    if ex:
        lines += ["## Dropped images (examples; all in drops.jsonl)", ""]
        for reason, es in ex.items():
            for e in es:
                extra = f" (kept: {e['kept']})" if "kept" in e else ""
                lines.append(f"- {reason}: `{e['source']}`{extra} {e.get('detail', '')}".rstrip())
        lines.append("")
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    return "\n".join(lines)

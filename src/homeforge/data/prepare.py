"""`homeforge prepare`: a raw folder -> a clean, scrubbed, deduplicated, tokenized dataset artifact.

Three streaming passes, so memory does not grow with the corpus:

1. **read + clean + scrub + sign** (worker processes): ingest records, normalise, filter by
   quality, replace PII, compute the exact hash and MinHash band hashes. Surviving records
   spill to a JSONL work file, hashes to flat binary files.
2. **dedup**: sort-based LSH clustering over the flat files (``data.dedup``).
3. **split + write + tokenize**: stream the work file again, drop duplicates, split by
   content hash, write ``{split}.jsonl``; train the tokenizer on the train split (or load
   one); stream the splits into token shards / tokenized records; write the report.

Every dropped record is counted by reason; bad lines and files are named in the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from homeforge import paths
from homeforge.data.plan import dataset_plan, input_paths, pii_secret
from homeforge.data.tokenizer import batched
from homeforge.errors import HomeforgeError

CHUNK = 256
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- worker side

_W: dict = {}


def _init_worker(cfg_json: dict, secret: bytes | None) -> None:
    from homeforge.config import PrepareConfig
    from homeforge.data.dedup import Signer
    from homeforge.data.pii import Scrubber

    cfg = PrepareConfig.model_validate(cfg_json)
    _W.clear()
    _W["cfg"] = cfg
    p = cfg.pii
    if p.enabled:
        terms = list(p.terms)
        if p.terms_file:
            terms += Path(p.terms_file).read_text(encoding="utf-8").splitlines()
        _W["scrubber"] = Scrubber(p.types, p.mode, secret, p.patterns, terms)
    d = cfg.dedup
    _W["signer"] = Signer(d.num_perm, d.threshold, d.ngram, d.char_ngram, d.seed) if d.near else None


def _dedup_text(rec: dict) -> str:
    if "messages" in rec:
        return "\n".join(f"{m['role']}: {m['content']}" for m in rec["messages"])
    return rec["text"]


def _process_chunk(recs: list[dict]) -> dict:
    """Clean, scrub, filter and sign a chunk of raw records (runs in a worker process).

    Every record is scrubbed, the dropped ones too: PII counts cover all records read, and
    the excerpts of dropped records in drops.jsonl carry no detected personal value. The
    filters measure the text before scrubbing (placeholders would skew the ratios).
    """
    from homeforge.data.clean import Drop, check, normalize
    from homeforge.data.dedup import exact_key
    from homeforge.data.drops import clean_entry

    cfg, scrubber, signer = _W["cfg"], _W.get("scrubber"), _W["signer"]
    cc = cfg.clean
    drops: list[dict] = []
    pii: Counter = Counter()
    labels_in: Counter = Counter()
    lines, exact, sigs = [], [], []

    def scrub(text: str) -> str:
        if scrubber is None:
            return text
        out, c = scrubber.scrub(text)
        pii.update(c)
        return out

    for raw in recs:
        out: dict = {}
        if "id" in raw:
            out["id"] = raw["id"]
        label = raw["label"].strip() if "label" in raw else None
        if label is not None:
            labels_in[label] += 1
        if "messages" in raw:
            msgs = [{"role": m["role"], "content": normalize(m["content"], cc)} for m in raw["messages"]]
            joined = "\n".join(m["content"] for m in msgs)
            clean_msgs = [dict(m, content=scrub(m["content"])) for m in msgs]
            drop = check(joined, cc)
            if drop is None and not any(m["role"] == "assistant" and m["content"] for m in msgs):
                drop = Drop("empty_assistant", what="no assistant message with content")
            if drop:
                drops.append(clean_entry(raw["_src"], drop, _dedup_text({"messages": clean_msgs}), None, raw.get("id")))
                continue
            out["messages"] = clean_msgs
        else:
            text = normalize(raw["text"], cc)
            scrubbed = scrub(text)
            drop = check(text, cc)
            if drop:
                drops.append(clean_entry(raw["_src"], drop, scrubbed, label, raw.get("id")))
                continue
            out["text"] = scrubbed
            if label is not None:
                out["label"] = label
        out["source"] = raw["_src"]
        dtext = _dedup_text(out)
        exact.append(exact_key(dtext))
        if signer is not None:
            sigs.append(signer.signature(dtext))
        lines.append(json.dumps(out, ensure_ascii=False).encode("utf-8") + b"\n")
    res = {"lines": lines, "exact": np.asarray(exact, dtype=np.uint64), "drops": drops, "pii": pii,
           "labels_in": labels_in}
    if signer is not None:
        s = np.stack(sigs) if sigs else np.zeros((0, signer.num_perm), dtype=np.uint32)
        res["sigs"] = s
        res["bands"] = signer.band_hashes(s)
    return res


# --------------------------------------------------------------------------- main side


def _bounded_map(fn, chunks: Iterator, workers: int, cfg_json: dict, secret: bytes | None) -> Iterator:
    """Ordered map over chunks in worker processes with at most 3x workers chunks in flight."""
    if workers <= 1:
        _init_worker(cfg_json, secret)
        for c in chunks:
            yield fn(c)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg_json, secret)) as pool:
        pending: deque = deque()
        for c in chunks:
            pending.append(pool.apply_async(fn, (c,)))
            if len(pending) >= 3 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def split_of(text: str, val: float, test: float, salt: str = "") -> str:
    h = int.from_bytes(hashlib.sha256(f"{salt}\0{text}".encode()).digest()[:8], "big") / 2**64
    if h < val:
        return "val"
    if h < val + test:
        return "test"
    return "train"


class _Progress:
    def __init__(self, console):
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                          TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)

    def __enter__(self):
        self.p.__enter__()
        return self

    def __exit__(self, *a):
        self.p.__exit__(*a)

    def task(self, name: str, total: float | None):
        return self.p.add_task(name, total=total, info="")

    def advance(self, task, n: float = 1, info: str | None = None):
        if info is None:
            self.p.advance(task, n)
        else:
            self.p.update(task, advance=n, info=info)


def _read_pass(cfg, files, names, builtins, work: Path, issues, bar, secret, droplog) -> dict:
    """Pass 1: read, clean, scrub, filter, hash; spill survivors to ``work``, drops to ``droplog``."""
    from homeforge.data.dedup import SpillArray, lsh_params
    from homeforge.data.ingest import Reader

    reader = Reader(cfg, issues)
    stats: dict = {"read": 0, "drops": Counter(), "pii": Counter(), "labels_in": Counter(), "bytes": 0}
    total_bytes = sum(_size(p) for p in files)
    task = bar.task("read, clean, scrub", total=total_bytes + len(builtins) or None)

    def records() -> Iterator[dict]:
        for p in files:
            for rec in reader.read(p, names[p]):
                stats["read"] += 1
                yield rec
            bar.advance(task, _size(p))
        for name in builtins:
            for rec in reader.builtin(name):
                stats["read"] += 1
                yield rec
            bar.advance(task, 1)

    near = cfg.dedup.near
    b = lsh_params(cfg.dedup.threshold, cfg.dedup.num_perm)[0] if near else 1
    exact_f = SpillArray(work / "exact.bin", np.uint64, 1)
    offsets_f = SpillArray(work / "offsets.bin", np.uint64, 1)  # byte offset of each record in records.jsonl
    # one file per band, so dedup maps one band column at a time (memory stays flat)
    bands_f = [SpillArray(work / f"band{j}.bin", np.uint64, 1) for j in range(b)] if near else None
    sigs_f = SpillArray(work / "sigs.bin", np.uint32, cfg.dedup.num_perm) if near else None
    workers = cfg.workers or os.cpu_count() or 1
    cfg_json = cfg.model_dump(mode="json")
    pos = 0
    with open(work / "records.jsonl", "wb") as out:
        for res in _bounded_map(_process_chunk, batched(records(), CHUNK), workers, cfg_json, secret):
            if res["lines"]:
                offs = np.cumsum([0] + [len(x) for x in res["lines"][:-1]], dtype=np.uint64) + np.uint64(pos)
                offsets_f.append(offs)
                blob = b"".join(res["lines"])
                out.write(blob)
                pos += len(blob)
            exact_f.append(res["exact"])
            if near:
                for j, f in enumerate(bands_f):
                    f.append(res["bands"][:, j])
                sigs_f.append(res["sigs"])
            for e in res["drops"]:
                droplog.add(e)
                stats["drops"][e["reason"]] += 1
            stats["pii"].update(res["pii"])
            stats["labels_in"].update(res["labels_in"])
            bar.advance(task, 0, info=f"{exact_f.n:,} records kept of {stats['read']:,}")
    stats["n"] = exact_f.n
    stats["exact"] = exact_f.open()[:, 0]
    stats["offsets"] = offsets_f.open()[:, 0]
    stats["bands"] = [f.open for f in bands_f] if near else None
    stats["sigs"] = sigs_f.rows() if near else None
    stats["tables"] = {name: t.correlated(cfg.report.corr_threshold) for name, t in reader.tables.items()}
    stats["formats"] = dict(reader.formats)
    return stats


class _RecordTexts:
    """The dedup text of record ``i`` of the work file, read by offset (for exact Jaccard checks)."""

    def __init__(self, path: Path, offsets: np.ndarray):
        self.fd = os.open(path, os.O_RDONLY)
        self.offsets = offsets
        self.size = os.fstat(self.fd).st_size

    def __call__(self, i: int) -> str:
        start = int(self.offsets[i])
        end = int(self.offsets[i + 1]) if i + 1 < len(self.offsets) else self.size
        return _dedup_text(json.loads(os.pread(self.fd, end - start, start)))

    def close(self) -> None:
        os.close(self.fd)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _write_pass(cfg, work: Path, dest: Path | None, roots, exact_dup, sigs, bar, droplog, exact_sim=None) -> dict:
    """Pass 2: drop duplicates (to ``droplog``, each with the record kept), split, write ``{split}.jsonl`` (if dest)."""
    from homeforge.data.augment import Reservoir
    from homeforge.data.dedup import EXACT_MARGIN, similarity
    from homeforge.data.drops import excerpt

    n = len(roots)
    idx = np.arange(n)
    has_members = np.zeros(n, dtype=bool)
    has_members[roots[roots != idx]] = True
    root_of: dict[int, tuple[str, str | None]] = {}  # cluster root -> (source, label)
    counts = {s: 0 for s in SPLITS}
    chars = {s: array("q") for s in SPLITS}
    labels = {s: Counter() for s in SPLITS}
    dups = Counter()
    dup_labels: Counter = Counter()
    reservoir = Reservoir(seed=cfg.augment.seed) if cfg.augment.enabled else None
    files = {}
    if dest is not None:
        files = {s: open(dest / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
    task = bar.task("split and write", total=n)
    try:
        with open(work / "records.jsonl", encoding="utf-8") as f:
            for i, line in enumerate(f):
                rec = json.loads(line)
                if has_members[i]:
                    root_of[i] = (rec["source"], rec.get("label"))
                r = int(roots[i])
                if r != i:
                    kind = "exact" if exact_dup[i] else "near"
                    dups[kind] += 1
                    e: dict = {"stage": "dedup", "source": rec["source"]}
                    if "id" in rec:
                        e["id"] = rec["id"]
                    e.update({"reason": f"{kind}_duplicate", "kept": root_of[r][0]})
                    if kind == "near":
                        thr, how = cfg.dedup.threshold, "estimated"
                        sim = similarity(sigs, r, i) if sigs is not None else 1.0
                        if exact_sim is not None and sim < thr + EXACT_MARGIN:
                            sim, how = exact_sim(r, i), "exact"
                        sim = round(sim, 3)
                        e.update({"value": sim, "limit": thr,
                                  "detail": f"{how} Jaccard similarity {sim:.2f} to {root_of[r][0]} (threshold {thr:.2f}"
                                            + (")" if sim >= thr else "; joined through a chain of near duplicates)")})
                    else:
                        e["detail"] = f"same text as {root_of[r][0]} (ignoring case, punctuation and spacing)"
                    if "label" in rec:
                        e["label"], e["kept_label"] = rec["label"], root_of[r][1]
                        dup_labels[rec["label"]] += 1
                    e["text"] = excerpt(_dedup_text(rec))
                    droplog.add(e)
                else:
                    text = _dedup_text(rec)
                    split = split_of(text, cfg.split.val, cfg.split.test, cfg.split.salt)
                    counts[split] += 1
                    chars[split].append(len(text))
                    if "label" in rec:
                        labels[split][rec["label"]] += 1
                    if reservoir is not None and split == "train" and "text" in rec:
                        reservoir.add_text(rec["text"])
                    if dest is not None:
                        files[split].write(line)
                if i % 1024 == 0:
                    bar.advance(task, min(1024, n - i))
    finally:
        for fh in files.values():
            fh.close()
    return {"counts": counts, "chars": {s: np.asarray(v, dtype=np.int64) for s, v in chars.items()},
            "labels": labels, "dups": dups, "dup_labels": dup_labels, "clusters": int(has_members.sum()),
            "vocab": reservoir.items if reservoir is not None else []}


def _augment(cfg, dest: Path, vocab: list[str]) -> int:
    from homeforge.data.augment import Augmenter, load_synonyms

    a = cfg.augment
    syn = load_synonyms(a.synonyms_file) if a.synonyms_file else None
    aug = Augmenter(list(a.ops), a.alpha, a.seed, sorted(set(vocab)), syn)
    n = 0
    tmp = dest / ".augmented.jsonl"
    with open(dest / "train.jsonl", encoding="utf-8") as f, open(tmp, "w", encoding="utf-8") as out:
        for line in f:
            rec = json.loads(line)
            for c in range(a.copies):
                new = dict(rec, text=aug.augment(rec["text"], c), augmented=True)
                out.write(json.dumps(new, ensure_ascii=False) + "\n")
                n += 1
    with open(tmp, encoding="utf-8") as src, open(dest / "train.jsonl", "a", encoding="utf-8") as dst:
        shutil.copyfileobj(src, dst)
    tmp.unlink()
    return n


CHAT_MAX_CHARS = 1_000_000


def _check_bounds(cfg) -> None:
    """Refuse settings that would tokenize one record whole without a bound (the memory would follow)."""
    if cfg.kind == "chat" and not 0 < cfg.clean.max_chars <= CHAT_MAX_CHARS:
        raise HomeforgeError(
            f"kind=chat needs clean.max_chars between 1 and {CHAT_MAX_CHARS:,} (it is {cfg.clean.max_chars:,}): a "
            "conversation is rendered and tokenized whole, so its memory grows with its length",
            fix=f"set clean.max_chars to at most {CHAT_MAX_CHARS:,} (default 200,000); text datasets have no such "
                "limit (long texts are tokenized piece by piece)")


def run(cfg, *, force: bool = False, check_only: bool = False, console=None, output: str | Path | None = None) -> dict:
    """Run the stage; returns {"out", "report", "skipped"}. ``check_only`` writes nothing."""
    from rich.console import Console

    from homeforge.data import report as rep
    from homeforge.data import tokenizer as toks
    from homeforge.data.dedup import find_duplicates, jaccard
    from homeforge.data.drops import DropLog
    from homeforge.data.ingest import Issues, discover

    console = console or Console()
    _check_bounds(cfg)
    files, builtins, names = discover(cfg.inputs)
    secret = pii_secret(cfg)
    if cfg.pii.enabled and cfg.pii.patterns:
        import re

        for name, rx in cfg.pii.patterns.items():
            try:
                re.compile(rx)
            except re.error as exc:
                raise HomeforgeError(f"pii.patterns.{name} is not a valid regular expression ({exc})",
                                     fix="correct the pattern (Python `re` syntax)") from None
    out = Path(output or cfg.output_dir).expanduser()
    if check_only:
        input_paths(cfg, files, names)  # a missing terms / synonyms / tokenizer folder is said all the same
    else:
        plan = dataset_plan(cfg, force=force, output=out, found=(files, builtins, names), secret=secret)
        out_p = plan.out
        if plan.up_to_date:
            console.print(f"[green]dataset up to date[/] {out_p} (same inputs and config; --force rebuilds)")
            return {"out": out_p, "report": json.loads((out_p / "report.json").read_text()), "skipped": True}
    encrypted = bool(cfg.encrypt)  # --encrypt / HOMEFORGE_ENCRYPT set it (config.py, paths.py)

    def build(dest: Path | None, work: Path) -> dict:
        droplog = DropLog(work)
        issues = Issues(cfg.strict, cfg.report.max_named_errors, sink=droplog.ingest)
        try:
            with _Progress(console) as bar:
                s1 = _read_pass(cfg, files, names, builtins, work, issues, bar, secret, droplog)
                texts = _RecordTexts(work / "records.jsonl", s1["offsets"])
                d = cfg.dedup

                def exact_sim(a: int, b: int) -> float:
                    return jaccard(texts(a), texts(b), d.ngram, d.char_ngram)

                try:
                    with console.status("finding duplicates"):
                        roots, exact_dup = find_duplicates(
                            s1["n"], s1["exact"] if d.exact else None, s1["bands"], s1["sigs"], d.threshold,
                            exact_similarity=exact_sim)
                    s2 = _write_pass(cfg, work, dest, roots, exact_dup, s1["sigs"], bar, droplog, exact_sim)
                finally:
                    texts.close()
                    if s1["sigs"] is not None:
                        s1["sigs"].close()
        finally:
            droplog.close()
        report = rep.build_report(cfg, files, builtins, issues, s1, s2, droplog, with_text=not encrypted)
        if cfg.kind == "classification":
            rep.check_labels(cfg, report)
        if sum(s2["counts"].values()) == 0:
            raise HomeforgeError(
                f"no records survived ({s1['read']} read; dropped: {dict(report['records']['dropped']) or 'none'})",
                where=", ".join(cfg.inputs),
                fix="see the reasons in the report (`--check-only` prints it); loosen clean.* filters, check fields.* "
                    "or the input format",
            )
        if dest is None:
            return report
        if s2["counts"]["train"] == 0:
            raise HomeforgeError("the train split is empty", fix="lower split.val / split.test or add data")
        droplog.finish(dest)
        if cfg.augment.enabled and cfg.kind != "chat":
            report["augmented"] = _augment(cfg, dest, s2["vocab"])
            s2["counts"]["train"] += report["augmented"]
        tok = toks.for_dataset(cfg, dest, console)
        tok.save_pretrained(str(dest / "tokenizer"))
        with _Progress(console) as bar:
            t = toks.tokenize_splits(cfg, tok, dest, s2["counts"], report.get("labels", {}).get("names", []), bar, SPLITS)
        rep.add_tokens(report, t["tokens"], len(tok), cfg.tokenizer.from_dir)
        rep.write_report(report, dest)
        return report

    if check_only:
        scratch = paths.scratch_dir() if cfg.encrypt else None  # encrypted data: plaintext work files in memory
        with tempfile.TemporaryDirectory(prefix="homeforge-check-", dir=scratch) as work:
            report = build(None, Path(work))
        console.print(rep.render_markdown(report), markup=False, highlight=False)
        return {"out": None, "report": report, "skipped": False}

    with plan.write() as art:
        work = art.dir / ".work"
        work.mkdir()
        try:
            report = build(art.dir, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        art.metrics = rep.manifest_metrics(report)
        art.extra["kind"] = cfg.kind
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    r = report["records"]
    console.print(f"[green]dataset[/] {out_p}: {r['in']:,} records in, {r['out']:,} out "
                  f"({', '.join(f'{k} {v:,}' for k, v in r['splits'].items() if v)}); "
                  f"{sum(r['dropped'].values()):,} dropped; report: {out_p / 'report.md'}", highlight=False)
    return {"out": out_p, "report": report, "skipped": False}

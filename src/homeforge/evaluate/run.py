"""`homeforge eval`: metrics of a model directory on a dataset artifact, an optional paired
comparison with a baseline model, quality gates, and a report (eval.json, eval.md, PNGs).

What is measured depends on the dataset kind (see docs/DEVELOPING.md):

* ``text``: sliding-window perplexity and bits per byte over whole documents; generation
  metrics on (first N tokens -> next M tokens) pairs; generation speed;
* ``chat``: perplexity of the assistant replies given their conversation; generation
  metrics on (conversation -> last assistant reply) pairs; generation speed;
* ``classification``: accuracy, macro-F1, per-class precision/recall, AUC-PR, confusion
  matrix and its entropy (the model must be a sequence classifier).

Robustness repeats the metrics on seeded character/word perturbations of the inputs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from homeforge import artifacts
from homeforge.config import EvalConfig
from homeforge.errors import HomeforgeError
from homeforge.evaluate import lm, metrics, robustness


class GateError(HomeforgeError):
    """A quality gate failed (the report was still written)."""

    exit_code = 3


# --------------------------------------------------------------------------- dataset

from homeforge.data.dataset import DatasetReader  # noqa: E402  (the one dataset reader)

# --------------------------------------------------------------------------- models


def model_kind(model_dir: Path) -> str:
    from homeforge.models.io import classifier_architecture

    return "classifier" if classifier_architecture(model_dir) else "causal-lm"


def load_model(model_dir: Path, kind: str):
    from homeforge.models.io import check_model_dir, load_causal_lm, load_classifier

    p = check_model_dir(model_dir)
    mk = model_kind(p)
    if kind == "classification" and mk != "classifier":
        raise HomeforgeError(f"{p} is a causal language model but the dataset is a classification dataset",
                             where=str(p), fix="evaluate a classifier (`homeforge train` method classify) on it, "
                             "or give a text/chat dataset for this model")
    if kind != "classification" and mk == "classifier":
        raise HomeforgeError(f"{p} is a sequence classifier but the dataset kind is {kind!r}", where=str(p),
                             fix="give a classification dataset (made by `homeforge prepare` with kind classification)")
    if mk == "classifier":
        return load_classifier(p)
    return load_causal_lm(p)


# --------------------------------------------------------------------------- one model


_prefix_id, _text_docs = lm.prefix_id, lm.text_docs


def _chat_split(rows: list[dict], path: Path) -> list[tuple[list[dict], str]]:
    from homeforge.data.chat import to_messages

    out = []
    for r in rows:
        msgs, problem = to_messages(r)
        if msgs is None:
            raise HomeforgeError(f"{path}: a record is not a conversation ({problem})", where=str(path),
                                 fix="check the dataset kind; chat records hold OpenAI-style 'messages'")
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append((msgs[:last], msgs[last]["content"]))
    return out


def _chat_prompt_ids(tok, history: list[dict]) -> list[int]:
    text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _chat_scored_docs(tok, pairs) -> list[tuple[list[int], int]]:
    """(prompt + reply ids, length of the prompt) for assistant-reply perplexity."""
    out = []
    eos = tok.eos_token_id
    for history, reply in pairs:
        p = _chat_prompt_ids(tok, history)
        r = tok(reply, add_special_tokens=False)["input_ids"] + [eos]
        out.append((p + r, len(p)))
    return out


def _progress(console: Console):
    from homeforge.progress import progress_bar

    return progress_bar(console)


def _ppl_block(nll: np.ndarray, count: np.ndarray, n_bytes: np.ndarray | None = None) -> dict:
    tot, n = float(nll.sum()), int(count.sum())
    out = {"loss": tot / n if n else float("nan"), "ppl": lm.ppl(tot, n), "tokens": n, "docs": len(nll)}
    if n_bytes is not None and n_bytes.sum() > 0:
        out["bits_per_byte"] = tot / math.log(2) / float(n_bytes.sum())
    return out


def evaluate_model(model_dir: Path, data: Path, cfg: EvalConfig, console: Console) -> dict:
    """All metrics of one model; ``per_example`` keeps paired per-example values for tests."""
    ds = DatasetReader.open(data)
    kind = ds.kind
    split = ds.resolve_split(cfg.split)
    model, tok = load_model(model_dir, kind)
    if tok is None:
        raise HomeforgeError(f"{model_dir} has no tokenizer", where=str(model_dir), fix="copy the tokenizer files in")
    path = data / f"{split}.jsonl"
    rows = ds.records(split, cfg.max_examples)
    if not rows:
        raise HomeforgeError(f"split {split!r} of {data} is empty", where=str(path), fix="evaluate another split")
    res: dict = {"model": str(model_dir), "dataset": str(data), "kind": kind, "split": split, "n_examples": len(rows)}
    per: dict = {}
    t0 = time.perf_counter()
    if kind == "classification":
        _eval_classification(model, tok, ds, split, rows, cfg, console, res, per)
    elif kind in ("text", "chat"):
        _eval_lm(model, tok, kind, path, rows, cfg, console, res, per)
    else:
        raise HomeforgeError(f"dataset kind {kind!r} is not one homeforge eval knows", where=str(data),
                             fix="kinds: text, chat, classification")
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["per_example"] = per
    return res


def _context(model, cfg_context: int | None) -> int:
    mx = getattr(model.config, "max_position_embeddings", None) or 1024
    return min(cfg_context or 1024, mx)


def _eval_lm(model, tok, kind, path, rows, cfg: EvalConfig, console, res, per) -> None:
    context = _context(model, cfg.context)
    stride = min(cfg.stride or context // 2, context - 1) if context > 1 else 1
    res["context"], res["stride"] = context, stride
    if kind == "text":
        docs, texts = _text_docs(rows, tok, path)
        n_bytes = np.array([len(t.encode("utf-8")) for t in texts], dtype=np.float64)
        scored = None
    else:
        pairs = _chat_split(rows, path)
        both = _chat_scored_docs(tok, pairs)
        docs = [ids for ids, _ in both]
        scored = [plen for _, plen in both]
        n_bytes = np.array([len(r.encode("utf-8")) for _, r in pairs], dtype=np.float64)
    nll, count = _nll(model, docs, context, stride, cfg.batch_size, console, "perplexity", prompt_lens=scored)
    res["perplexity"] = _ppl_block(nll, count, n_bytes)
    per["doc_loss"] = (nll / np.maximum(count, 1)).tolist()
    per["doc_tokens"] = count.tolist()

    prompts, refs, preds, noisy_prompt = [], [], [], None
    if cfg.generation.enabled:
        g = cfg.generation
        if kind == "text":
            prompts, refs = [], []
            for ids in docs:
                body = ids[1:-1]
                if len(body) >= g.prompt_tokens + g.max_new_tokens:
                    prompts.append(ids[: 1 + g.prompt_tokens])
                    refs.append(tok.decode(body[g.prompt_tokens: g.prompt_tokens + g.max_new_tokens]))
                if len(prompts) >= g.max_examples:
                    break
            pfx = _prefix_id(tok)

            def noisy_prompt(i, pk, rate, seed):  # perturb the prompt's text, keep the reference
                text = tok.decode(prompts[i][1:])
                return [pfx, *tok(robustness.perturb(text, pk, rate, seed), add_special_tokens=False)["input_ids"]]
        else:
            sel = pairs[: g.max_examples]
            prompts = [_chat_prompt_ids(tok, h) for h, _ in sel]
            refs = [r for _, r in sel]

            def noisy_prompt(i, pk, rate, seed):  # perturb the user turns
                return _chat_prompt_ids(tok, [{**m, "content": robustness.perturb(m["content"], pk, rate, seed)}
                                              if m["role"] == "user" else m for m in sel[i][0]])
        if prompts:
            with _progress(console) as bar:
                task = bar.add_task("generating", total=len(prompts), info="")
                preds, speed = lm.generate_greedy(model, tok, prompts, g.max_new_tokens, lambda n: bar.advance(task, n))
            gm = metrics.generation_metrics(preds, refs)
            per["gen"] = gm.pop("per_example")
            res["generation"] = {**gm, "samples": [{"reference": r, "prediction": p} for p, r in
                                                   list(zip(preds, refs, strict=True))[:5]]}
            res["speed"] = speed
        else:
            res["generation"] = {"skipped": f"no document has {g.prompt_tokens}+{g.max_new_tokens} tokens"}

    if cfg.robustness.enabled:
        rb = cfg.robustness
        out = {}
        for pk, rate in (("char", rb.char_rate), ("word", rb.word_rate)):
            if kind == "text":
                noisy = [robustness.perturb(t, pk, rate, rb.seed) for t in texts[: rb.max_examples]]
                ndocs, _ = _text_docs([{"text": t} for t in noisy], tok, path)
                nn_, nc = _nll(model, ndocs, context, stride, cfg.batch_size, console, f"robustness ({pk})")
                nb = np.array([len(t.encode("utf-8")) for t in noisy], dtype=np.float64)
                block = _ppl_block(nn_, nc, nb)
            else:  # perturb the user turns, score the clean reply
                npairs = [([{**m, "content": robustness.perturb(m["content"], pk, rate, rb.seed)}
                            if m["role"] == "user" else m for m in h], r) for h, r in pairs[: rb.max_examples]]
                both = _chat_scored_docs(tok, npairs)
                nn_, nc = _nll(model, [i for i, _ in both], context, stride, cfg.batch_size, console,
                               f"robustness ({pk})", prompt_lens=[p for _, p in both])
                block = _ppl_block(nn_, nc)
            clean_n = min(rb.max_examples, len(nll))
            clean_ppl = lm.ppl(float(nll[:clean_n].sum()), int(count[:clean_n].sum()))
            block["clean_ppl_same_examples"] = clean_ppl
            block["ppl_ratio"] = block["ppl"] / clean_ppl if clean_ppl else float("nan")
            block["rate"] = rate
            n_gen = min(rb.max_examples, len(preds))
            if n_gen and noisy_prompt is not None:
                with _progress(console) as bar:
                    task = bar.add_task(f"generating ({pk})", total=n_gen, info="")
                    npreds, _ = lm.generate_greedy(model, tok, [noisy_prompt(i, pk, rate, rb.seed) for i in range(n_gen)],
                                                   cfg.generation.max_new_tokens, lambda n, t=task: bar.advance(t, n))
                gm = metrics.generation_metrics(npreds, refs[:n_gen])
                clean = metrics.generation_metrics(preds[:n_gen], refs[:n_gen])
                per[f"robust_{pk}_gen"] = gm.pop("per_example")
                block["generation"] = {**gm, "clean_same_examples": {k: clean[k] for k in ("bleu", "rouge_l",
                                                                                            "exact_match")}}
            out[pk] = block
            per[f"robust_{pk}_doc_loss"] = (nn_ / np.maximum(nc, 1)).tolist()
        res["robustness"] = out


def _nll(model, docs, context, stride, batch_size, console, label, prompt_lens=None):
    """Per-doc NLL; with ``prompt_lens`` only the tokens after each prompt are counted."""
    if prompt_lens is None:
        with _progress(console) as bar:
            task = bar.add_task(label, total=lm.count_windows(docs, context, stride), info=f"{len(docs)} docs")
            return lm.document_nll(model, docs, context, stride, batch_size, lambda n: bar.advance(task, n))
    # chat: score reply tokens only; the prompt is context. Keep the last `context` tokens.
    import torch
    import torch.nn.functional as F

    nll = np.zeros(len(docs))
    count = np.zeros(len(docs), dtype=np.int64)
    with _progress(console) as bar, torch.no_grad():
        task = bar.add_task(label, total=len(docs), info="")
        for i, (ids, plen) in enumerate(zip(docs, prompt_lens, strict=True)):
            start = max(0, len(ids) - context)
            x = torch.tensor([ids[start:]])
            logp = F.log_softmax(model(input_ids=x).logits.float()[0, :-1], -1)
            tgt = x[0, 1:]
            tok_nll = -logp.gather(-1, tgt[:, None])[:, 0]
            first = max(plen - start - 1, 0)
            nll[i] = float(tok_nll[first:].sum())
            count[i] = int(tok_nll[first:].numel())
            bar.advance(task)
    return nll, count


def _eval_classification(model, tok, ds: DatasetReader, split, rows, cfg: EvalConfig, console, res, per) -> None:
    tok_path = ds.root / f"{split}.tokens.jsonl"
    if not tok_path.is_file():
        raise HomeforgeError(f"classification dataset {ds.root} has no {tok_path.name}", where=str(ds.root),
                             fix="re-create it with `homeforge prepare`")
    trows = ds.token_records(split, ("input_ids", "label"), limit=cfg.max_examples)
    n_classes = model.config.num_labels
    labels = ds.labels() or [str(i) for i in range(n_classes)]
    if len(labels) != n_classes:
        raise HomeforgeError(f"the dataset has {len(labels)} labels but the classifier predicts {n_classes}",
                             where=str(ds.root / "labels.json"),
                             fix="evaluate the classifier on the dataset it was trained for")
    mx = getattr(model.config, "max_position_embeddings", 10**9)
    inputs = [r["input_ids"][-mx:] for r in trows]
    y = np.array([int(r["label"]) for r in trows])
    with _progress(console) as bar:
        task = bar.add_task("classifying", total=len(inputs), info="")
        probs = lm.classify(model, inputs, cfg.batch_size, lambda n: bar.advance(task, n))
    pred = probs.argmax(1)
    res["classification"] = metrics.classification_metrics(y, pred, n_classes, scores=probs, labels=labels)
    per["correct"] = (pred == y).astype(int).tolist()
    if cfg.robustness.enabled and all(isinstance(r.get("text"), str) for r in rows) and len(rows) == len(trows):
        rb = cfg.robustness
        out = {}
        n = min(rb.max_examples, len(rows))
        for pk, rate in (("char", rb.char_rate), ("word", rb.word_rate)):
            noisy = [robustness.perturb(r["text"], pk, rate, rb.seed) for r in rows[:n]]
            enc = tok(noisy, add_special_tokens=False)["input_ids"]
            # same framing as the prepared inputs: keep any special prefix/suffix tokens
            pre, suf = _framing(tok, rows[0]["text"], trows[0]["input_ids"])
            nprobs = lm.classify(model, [(pre + e + suf)[-mx:] for e in enc], cfg.batch_size)
            npred = nprobs.argmax(1)
            acc = float((npred == y[:n]).mean())
            out[pk] = {"rate": rate, "accuracy": acc, "clean_accuracy_same_examples": float((pred[:n] == y[:n]).mean()),
                       "n": n}
            per[f"robust_{pk}_correct"] = (npred == y[:n]).astype(int).tolist()
        res["robustness"] = out
    elif cfg.robustness.enabled:
        res["robustness"] = {"skipped": "the records have no 'text' aligned with the tokenized inputs"}


def _framing(tok, text: str, ids: list[int]) -> tuple[list[int], list[int]]:
    plain = tok(text, add_special_tokens=False)["input_ids"]
    for i in range(len(ids) - len(plain) + 1):
        if ids[i: i + len(plain)] == plain:
            return ids[:i], ids[i + len(plain):]
    return [], []


# --------------------------------------------------------------------------- comparison + gates


def compare(res: dict, base: dict, resamples: int) -> dict:
    """Paired tests of the model (b) against the baseline (a) on the same examples."""
    pm, pb = res["per_example"], base["per_example"]
    out: dict = {}
    if "doc_loss" in pm and len(pm["doc_loss"]) == len(pb["doc_loss"]) >= 2:
        t = metrics.paired_bootstrap(pb["doc_loss"], pm["doc_loss"], resamples)
        t["metric"] = "per-document loss (nats/token); positive delta = model worse"
        t["ppl_model"], t["ppl_baseline"] = res["perplexity"]["ppl"], base["perplexity"]["ppl"]
        t["ppl_relative_change"] = t["ppl_model"] / t["ppl_baseline"] - 1
        out["perplexity"] = t
    if "gen" in pm and "gen" in pb and len(pm["gen"]["rouge_l"]) == len(pb["gen"]["rouge_l"]) >= 2:
        for key in ("rouge_l", "bleu"):
            t = metrics.paired_bootstrap(pb["gen"][key], pm["gen"][key], resamples)
            t["metric"] = f"per-example {key}; positive delta = model better"
            out[key] = t
    if "correct" in pm and len(pm["correct"]) == len(pb["correct"]):
        t = metrics.mcnemar(pb["correct"], pm["correct"])
        t["metric"] = "accuracy; positive delta = model better"
        out["accuracy"] = t
    return out


def check_gates(res: dict, comparison: dict | None, cfg: EvalConfig) -> list[dict]:
    g = cfg.gates
    out = []
    if g.max_ppl is not None and "perplexity" in res:
        v = res["perplexity"]["ppl"]
        out.append({"gate": "max_ppl", "value": v, "threshold": g.max_ppl, "passed": bool(v <= g.max_ppl),
                    "detail": f"perplexity {v:.3f} {'<=' if v <= g.max_ppl else '>'} {g.max_ppl}"})
    if g.min_accuracy is not None:
        if "classification" not in res:
            out.append({"gate": "min_accuracy", "passed": False, "detail": "min_accuracy set but the dataset is not a "
                        "classification dataset"})
        else:
            v = res["classification"]["accuracy"]
            out.append({"gate": "min_accuracy", "value": v, "threshold": g.min_accuracy, "passed": bool(v >= g.min_accuracy),
                        "detail": f"accuracy {v:.4f} {'>=' if v >= g.min_accuracy else '<'} {g.min_accuracy}"})
    if g.max_regression is not None:
        if not comparison:
            out.append({"gate": "max_regression", "passed": False, "detail": "max_regression needs --baseline"})
        elif "perplexity" in comparison:
            c = comparison["perplexity"]
            worse = c["ppl_relative_change"]
            fail = worse > g.max_regression and c["p_value"] < g.p_value and c["delta"] > 0
            out.append({"gate": "max_regression", "value": worse, "threshold": g.max_regression, "p_value": c["p_value"],
                        "passed": not fail, "detail": f"perplexity {worse:+.2%} vs baseline (p={c['p_value']:.4f}); "
                        f"fails above +{g.max_regression:.2%} when p < {g.p_value}"})
        elif "accuracy" in comparison:
            c = comparison["accuracy"]
            drop = -c["delta"]
            fail = drop > g.max_regression and c["p_value"] < g.p_value
            out.append({"gate": "max_regression", "value": drop, "threshold": g.max_regression, "p_value": c["p_value"],
                        "passed": not fail, "detail": f"accuracy {c['delta']:+.4f} vs baseline (p={c['p_value']:.4f}); "
                        f"fails for a drop above {g.max_regression} when p < {g.p_value}"})
    return out


# --------------------------------------------------------------------------- command


def run(model_dir: Path, data: Path, cfg: EvalConfig, baseline: Path | None, output: Path | None,
        force: bool, console: Console) -> dict:
    """Evaluate, compare, gate and write the report artifact; raise GateError if a gate fails."""
    from homeforge.runtime import torch_threads

    with torch_threads(cfg.threads):
        return _run(model_dir, data, cfg, baseline, output, force, console)


def report_plan(model_dir: Path, data: Path, cfg: EvalConfig, baseline: Path | None, output: Path | None,
                force: bool = False) -> artifacts.Plan:
    """The report artifact's plan (``up_to_date``: `eval` would reuse it), as ``run`` makes it."""
    model_dir = Path(model_dir)
    output = Path(output) if output else model_dir.parent / f"{model_dir.name}-eval"
    inputs = {"model": model_dir, "data": data, **({"baseline": baseline} if baseline else {})}
    return artifacts.plan(output, stage="eval", config=cfg.model_dump(mode="json"), inputs=inputs, force=force,
                          encrypt=cfg.encrypt)


def _run(model_dir: Path, data: Path, cfg: EvalConfig, baseline: Path | None, output: Path | None,
         force: bool, console: Console) -> dict:
    from homeforge.evaluate import report

    model_dir, data = Path(model_dir), Path(data)
    artifacts.verify(data, deep=False)
    plan = report_plan(model_dir, data, cfg, baseline, output, force)
    out_p = plan.out
    if plan.up_to_date:
        console.print(f"[green]evaluation up to date[/] {out_p} (same model, data and config; --force re-runs)")
        result = json.loads((out_p / "eval.json").read_text())
    else:
        res = evaluate_model(model_dir, data, cfg, console)
        base = evaluate_model(Path(baseline), data, cfg, console) if baseline else None
        comparison = compare(res, base, cfg.bootstrap_resamples) if base else None
        result = {"model": res, "baseline": base, "comparison": comparison}
        with plan.write() as art:
            report.write(art.dir, result)
            result["gates"] = check_gates(res, comparison, cfg)
            (art.dir / "eval.json").write_text(json.dumps(result, indent=2, default=_json_default))
            (art.dir / "eval.md").write_text(report.markdown(result))
            art.metrics = report.headline(result)
            art.extra["kind"] = res["kind"]
    result["gates"] = check_gates(result["model"], result.get("comparison"), cfg)
    report.print_summary(result, console)
    console.print(f"[green]report[/] {out_p}/eval.md")
    failed = [g for g in result["gates"] if not g["passed"]]
    if failed:
        raise GateError("quality gate failed: " + "; ".join(f"{g['gate']}: {g['detail']}" for g in failed),
                        where=str(out_p / "eval.md"),
                        fix="improve the model, or relax the gate in the eval config (gates.*) if this is expected")
    return result


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)

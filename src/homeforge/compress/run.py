"""`homeforge compress`: make a smaller/faster model directory, measure it against the
original (size on disk, latency at batch 1 and 8, perplexity) and refuse to write it when
the quality gate fails (unless --force)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from homeforge import artifacts
from homeforge.config import CompressConfig
from homeforge.errors import HomeforgeError

QUANT = ("int8-dynamic", "int8-block", "int8-weight-only", "int4-weight-only")


class CompressGateError(HomeforgeError):
    """The compressed model failed the quality gate; nothing was written."""

    exit_code = 3


# --------------------------------------------------------------------------- measurements


def weights_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


@torch.no_grad()
def latency_ms(model, vocab_size: int, batch: int, seq_len: int, repeats: int) -> float:
    """Median wall time (ms) of one forward pass over ``batch`` x ``seq_len`` tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (batch, seq_len), generator=g)
    model(input_ids=x)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=x)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def quality_docs(data: Path, split: str, tok, max_examples: int) -> tuple[list[list[int]], list[str]]:
    from homeforge.data.dataset import DatasetReader
    from homeforge.evaluate.lm import text_docs

    ds = DatasetReader.open(data)
    kind = ds.kind
    if kind != "text":
        raise HomeforgeError(f"the compress quality gate of a language model needs a text dataset; {data} is kind "
                             f"{kind!r}", where=str(data), fix="pass --data with a text dataset (e.g. the quickstart's "
                             "data directory or `homeforge prepare` with kind text)")
    split = ds.resolve_split(split)
    return text_docs(ds.records(split, max_examples), tok, ds.root / f"{split}.jsonl")


def quality_records(data: Path, split: str, max_examples: int) -> tuple[list[list[int]], list[int]]:
    """(input_ids, labels) of a classification dataset split, for a classifier's accuracy gate."""
    from homeforge.data.dataset import DatasetReader

    ds = DatasetReader.open(data)
    kind = ds.kind
    if kind != "classification":
        raise HomeforgeError(f"the quality gate of a classifier needs a classification dataset; {data} is kind "
                             f"{kind!r}", where=str(data), fix="pass --data with the classification dataset it was "
                             "trained for")
    rows = ds.token_records(ds.resolve_split(split), ("input_ids", "label"), limit=max_examples)
    return [r["input_ids"] for r in rows], [int(r["label"]) for r in rows]


def accuracy(model, records) -> float:
    from homeforge.evaluate.lm import classify

    inputs, labels = records
    probs = classify(model, inputs)
    return float((probs.argmax(1) == torch.tensor(labels).numpy()).mean())


def perplexity(model, docs, context: int) -> float:
    from homeforge.evaluate.lm import document_nll, ppl

    nll, count = document_nll(model, docs, context, context // 2, batch_size=8)
    return ppl(float(nll.sum()), int(count.sum()))


def interleaved_latency(before, after, vocab_size: int, seq_len: int, repeats: int) -> dict[str, dict[str, float]]:
    """Latency of both models at batch 1 and 8, alternating rounds so machine load hits both alike."""
    out: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for _ in range(repeats):
        for b in (1, 8):
            for name, m in (("before", before), ("after", after)):
                out[name].setdefault(f"latency_b{b}_ms", []).append(latency_ms(m, vocab_size, b, seq_len, 1))
    return {name: {k: statistics.median(v) for k, v in d.items()} for name, d in out.items()}


def measure(model, model_dir: Path, docs, cfg: CompressConfig) -> dict:
    from homeforge.compress.quantize import linear_weight_bytes

    lin, _ = linear_weight_bytes(model_dir)
    out = {"weights_bytes": weights_on_disk(model_dir), "linear_bytes": lin,
           "params": sum(p.numel() for p in model.parameters())}
    if isinstance(docs, tuple):  # classifier records
        out["accuracy"] = accuracy(model, docs)
    elif docs is not None:
        out["ppl"] = perplexity(model, docs, min(cfg.context, model.config.max_position_embeddings))
    return out


# --------------------------------------------------------------------------- methods


def _train_texts(data: Path | None, split: str, limit: int = 100_000) -> list[str]:
    from homeforge.data.dataset import DatasetReader

    if data is None:
        raise HomeforgeError("this method trains on data: pass --data DATASET", fix="e.g. --data runs/quickstart/data")
    ds = DatasetReader.open(data)
    rows = ds.records(ds.resolve_split(split), limit)
    return [r["text"] for r in rows if isinstance(r.get("text"), str)]


def _train_on_engine(task, tcfg, console: Console, title: str) -> list[float]:
    """Run a QAT / distillation task on the training engine with a progress bar; the losses per step."""
    import shutil

    from homeforge.progress import progress_bar
    from homeforge.train.loop import train_task
    from homeforge.train.run import step_summary

    with progress_bar(console) as bar:
        bar_task = bar.add_task(title, total=tcfg.max_steps, info="")

        def on_step(state, rec):
            bar.update(bar_task, completed=state.step, total=state.total_steps, info=step_summary(rec))

        state = train_task(task, tcfg, tcfg.output_dir, progress=on_step)
    shutil.rmtree(Path(tcfg.output_dir) / "checkpoints", ignore_errors=True)  # kept: metrics.jsonl, loss.png
    return [r["loss"] for r in state.history]


def _int8_prepare(model, tok, data: Path | None, cfg: CompressConfig, classifier: bool,
                  console: Console) -> tuple[bool, tuple[str, ...], dict]:
    """SmoothQuant folded into ``model`` and the layer layout, from calibration text of the train split
    (compress/smooth.py). Returns (quantize the head, layers kept fp32, facts for the manifest)."""
    from homeforge.compress import smooth

    auto = cfg.quantize_head is None or cfg.keep_fp32 is None
    if classifier or data is None or (cfg.smoothquant_alpha is None and not auto):
        # no calibration text: the layout as given, else every Linear for classifiers (their head is never
        # quantized) and the cautious layout (head and down projections fp32) for language models
        keep = cfg.keep_fp32 if cfg.keep_fp32 is not None else ([] if classifier else ["down_proj"])
        return bool(cfg.quantize_head), tuple(keep), {}
    texts = _train_texts(data, cfg.train_split, limit=5_000)
    batches = smooth.calibration_batches(texts, tok, max(1, cfg.calibration_tokens // cfg.context), cfg.context)
    facts: dict = {}
    with torch.no_grad():
        if cfg.smoothquant_alpha is not None:
            with console.status(f"SmoothQuant: calibrating on {sum(b.numel() for b in batches):,} tokens"):
                facts["smoothing"] = smooth.smooth(model, batches, cfg.smoothquant_alpha)
        if not auto:
            return bool(cfg.quantize_head), tuple(cfg.keep_fp32), facts
        with console.status("choosing the int8 layout (fastest that keeps top-1 agreement)"):
            facts["layout"] = smooth.int8_layout(model, batches, cfg.quantize_head, cfg.keep_fp32,
                                                 cfg.int8_min_agreement)
    return facts["layout"]["quantize_head"], tuple(facts["layout"]["keep_fp32"]), facts


def compress_into(model, tok, method: str, tmp: Path, data: Path | None, cfg: CompressConfig,
                  console: Console, classifier: bool = False) -> dict:
    """Write the compressed model directory into ``tmp``; returns method facts for the manifest."""
    from homeforge.compress import prune, quantize
    from homeforge.models.io import save_model_dir
    from homeforge.train.methods import compression as ct

    facts: dict = {}
    if method in QUANT:
        head, keep, found = False, (), {}
        if method == "int8-dynamic":
            head, keep, found = _int8_prepare(model, tok, data, cfg, classifier, console)
        elif method == "int8-block":  # like llama.cpp's q8_0: every Linear and the head, unless told otherwise
            head, keep = cfg.quantize_head is not False and not classifier, tuple(cfg.keep_fp32 or ())
        facts["quantization"] = quantize.save_quantized(model, tok, tmp, method, cfg.group_size, include_head=head,
                                                        keep=keep)
        facts["quantization"].update(found, keep_fp32=list(keep))
    elif method == "qat":
        q = cfg.qat
        tokens = ct.token_stream(_train_texts(data, cfg.train_split), tok)
        tcfg = ct.short_run_config(steps=q.steps, lr=q.lr, seq_len=q.seq_len, batch_size=q.batch_size, seed=0,
                                   output_dir=str(tmp / "training"), threads=cfg.threads)
        qat_head = cfg.quantize_head is not False  # null: the head is trained and stored int8
        names = quantize.quantizable_linears(model, qat_head)
        losses = _train_on_engine(ct.qat_task(model, tokens, tcfg, names), tcfg, console, "QAT fine-tuning")
        ct.swap_fake_quant(model, names, wrap=False)
        model.eval()
        facts["qat"] = {"first_loss": losses[0], "last_loss": losses[-1], "steps": len(losses)}
        facts["quantization"] = quantize.save_quantized(model, tok, tmp, "int8-dynamic", include_head=qat_head)
        facts["quantization"]["trained_with"] = "qat"
    elif method == "distill":
        from homeforge.models.presets import build_model, preset_config

        d = cfg.distill
        tokens = ct.token_stream(_train_texts(data, cfg.train_split), tok)
        scfg = preset_config(d.student_preset, model.config.vocab_size, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, overrides=d.student_overrides)
        student = build_model(scfg, seed=d.seed)
        tcfg = ct.short_run_config(steps=d.steps, lr=d.lr, seq_len=d.seq_len, batch_size=d.batch_size, seed=d.seed,
                                   output_dir=str(tmp / "training"), threads=cfg.threads)
        task = ct.distill_task(model, student, tokens, tcfg, d.alpha, d.temperature)
        losses = _train_on_engine(task, tcfg, console, f"distilling into {d.student_preset}")
        student.eval()
        facts["distill"] = {"student_preset": d.student_preset, "first_loss": losses[0], "last_loss": losses[-1],
                            "alpha": d.alpha, "temperature": d.temperature, "steps": len(losses)}
        save_model_dir(student, tok, tmp)
    elif method == "prune":
        p = cfg.prune
        if p.kind == "unstructured":
            facts["prune"] = {"kind": "unstructured", **prune.prune_unstructured(model, p.sparsity)}
            save_model_dir(model, tok, tmp)
        else:
            small, stats = prune.prune_structured(model, p.mlp_keep, p.heads_keep)
            facts["prune"] = {"kind": "structured", **stats}
            save_model_dir(small, tok, tmp)
    else:
        raise HomeforgeError(f"unknown compression method {method!r}")
    return facts


# --------------------------------------------------------------------------- command


def run(model_dir: Path, data: Path | None, cfg: CompressConfig, output: Path | None, force: bool,
        console: Console) -> dict:
    """Compress, measure before/after, gate and write the artifact (``cfg.threads`` only inside)."""
    from homeforge.runtime import torch_threads

    with torch_threads(cfg.threads):
        return _run(Path(model_dir), data, cfg, output, force, console)


def output_plan(model_dir: Path, data: Path | None, cfg: CompressConfig, output: Path | None,
                force: bool = False) -> artifacts.Plan:
    """The compressed model's plan (``up_to_date``: `compress` would reuse it), as ``run`` makes it."""
    model_dir = Path(model_dir)
    output = Path(output) if output else model_dir.parent / f"{model_dir.name}-{cfg.method}"
    inputs = {"model": model_dir, **({"data": data} if data else {})}
    return artifacts.plan(output, stage="compress", config=cfg.model_dump(mode="json"), inputs=inputs, force=force,
                          encrypt=cfg.encrypt)


def _run(model_dir: Path, data: Path | None, cfg: CompressConfig, output: Path | None, force: bool,
         console: Console) -> dict:
    from homeforge.evaluate.run import model_kind
    from homeforge.models.io import check_model_dir

    model_dir = check_model_dir(model_dir)
    from homeforge.models.quantized import read_quantization

    done = read_quantization(model_dir)
    if done:
        raise HomeforgeError(f"{model_dir} is already quantized ({done.get('method')})", where=str(model_dir),
                             fix="compress the original full-precision model directory instead")
    classifier = model_kind(model_dir) == "classifier"
    if classifier and not (cfg.method in QUANT or (cfg.method == "prune" and cfg.prune.kind == "unstructured")):
        raise HomeforgeError(f"method {cfg.method!r} is for causal language models; {model_dir} is a sequence "
                             "classifier", where=str(model_dir),
                             fix=f"for classifiers use {', '.join(QUANT)} or prune with prune.kind=unstructured")
    if data is None and not force:
        raise HomeforgeError("no --data given, so the quality gate cannot run",
                             fix="pass --data DATASET (a text dataset artifact), or --force to write the compressed "
                             "model without a quality check")
    if data is not None:
        artifacts.verify(data, deep=False)
    plan = output_plan(model_dir, data, cfg, output, force)
    out_p = plan.out
    if plan.up_to_date:
        console.print(f"[green]compressed model up to date[/] {out_p} (same model, data and config; --force re-runs)")
        return json.loads((out_p / "compress.json").read_text())
    model, tok = _load(model_dir, classifier)
    if data is None:
        docs = None
    elif classifier:
        docs = quality_records(data, cfg.split, cfg.max_examples)
    else:
        docs = quality_docs(data, cfg.split, tok, cfg.max_examples)[0]
    with console.status("measuring the original model"):
        before = measure(model, model_dir, docs, cfg)
    with plan.write() as art:
        with art.timed("compress"):
            facts = compress_into(model, tok, cfg.method, art.dir, data, cfg, console, classifier)
        del model
        with console.status("measuring the compressed model"):
            (art.dir / "homeforge.json").write_text(json.dumps({"quantization": facts.get("quantization")}))
            small, _ = _load(art.dir, classifier, verify=False)  # exactly what users will load (our own temp dir)
            (art.dir / "homeforge.json").unlink()
            after = measure(small, art.dir, docs, cfg)
            if "quantization" in facts:
                after["params"] = before["params"]  # packed int8 weights are not nn.Parameters
            original, _ = _load(model_dir, classifier)
            lat = interleaved_latency(original, small, original.config.vocab_size, cfg.latency_seq_len,
                                      cfg.latency_repeats)
            del original
            before.update(lat["before"])
            after.update(lat["after"])
        after.update(_method_checks(small, facts))
        result = {"method": cfg.method, "source": str(model_dir), "latency_seq_len": cfg.latency_seq_len,
                  "threads": torch.get_num_threads(), "before": before, "after": after,
                  "gate": gate(before, after, cfg), **facts}
        _print_table(result, console)
        if not result["gate"]["passed"] and not force:
            raise CompressGateError(f"the {cfg.method} model failed the quality gate: {result['gate']['detail']}; "
                                    f"nothing was written", where=str(out_p),
                                    fix="relax gates.max_ppl_increase, choose a milder method (e.g. int8-dynamic, "
                                    "fewer pruned channels), or pass --force to write it anyway")
        (art.dir / "compress.json").write_text(json.dumps(result, indent=2))
        (art.dir / "compress.md").write_text(markdown(result))
        plot(result, art.dir / "compress.png")
        art.metrics = {"before": before, "after": after, "gate": result["gate"]}
        art.extra.update({k: v for k, v in facts.items()})
        art.extra["kind"] = "model"
    if not result["gate"]["passed"]:
        console.print(f"[yellow]written despite the failed gate (--force)[/]: {result['gate']['detail']}")
    console.print(f"[green]compressed model[/] {out_p}")
    return result


def _load(path: Path, classifier: bool, verify: bool = True):
    from homeforge.models.io import load_model

    model, tok = load_model(path, head="classifier" if classifier else "causal", verify=verify)
    if classifier and model.config.pad_token_id is None:  # HF classifiers refuse batches > 1 without one
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model, tok


def _method_checks(model, facts: dict) -> dict:
    from homeforge.compress.prune import linear_sparsity

    out = {}
    if "prune" in facts:
        out["linear_sparsity"] = linear_sparsity(model)
    return out


def gate(before: dict, after: dict, cfg: CompressConfig) -> dict:
    if "accuracy" in before:
        drop = before["accuracy"] - after["accuracy"]
        ok = drop <= cfg.gates.max_accuracy_drop
        return {"passed": bool(ok), "checked": True, "accuracy_drop": drop,
                "max_accuracy_drop": cfg.gates.max_accuracy_drop,
                "detail": f"accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f} ({-drop:+.4f}; allowed "
                          f"-{cfg.gates.max_accuracy_drop})"}
    if "ppl" not in before:
        return {"passed": False, "detail": "no quality measurement (no --data)", "checked": False}
    change = after["ppl"] / before["ppl"] - 1
    ok = change <= cfg.gates.max_ppl_increase
    return {"passed": bool(ok), "checked": True, "ppl_change": change, "max_ppl_increase": cfg.gates.max_ppl_increase,
            "detail": f"perplexity {before['ppl']:.3f} -> {after['ppl']:.3f} ({change:+.2%}; allowed "
                      f"+{cfg.gates.max_ppl_increase:.2%})"}


def _rows(r: dict) -> list[tuple[str, str, str, str]]:
    b, a = r["before"], r["after"]
    rows = []

    def add(name, key, fmt, ratio=True, inverse=False):
        if key in b and key in a:
            rat = ""
            if ratio and a[key]:
                rat = f"{(b[key] / a[key]) if inverse else (a[key] / b[key]):.2f}x"
            rows.append((name, format(b[key], fmt), format(a[key], fmt), rat))

    add("weights on disk (MB)", "weights_bytes", ",.0f", inverse=True)
    rows[-1] = (rows[-1][0], f"{b['weights_bytes'] / 1e6:.2f}", f"{a['weights_bytes'] / 1e6:.2f}", rows[-1][3] + " smaller")
    rows.append(("Linear weights (MB)", f"{b['linear_bytes'] / 1e6:.2f}", f"{a['linear_bytes'] / 1e6:.2f}",
                 f"{b['linear_bytes'] / max(1, a['linear_bytes']):.2f}x smaller"))
    add("parameters", "params", ",d", ratio=False)
    for bs in (1, 8):
        k = f"latency_b{bs}_ms"
        rows.append((f"latency batch {bs} (ms)", f"{b[k]:.1f}", f"{a[k]:.1f}", f"{b[k] / a[k]:.2f}x faster"))
    if "ppl" in b:
        rows.append(("perplexity", f"{b['ppl']:.3f}", f"{a['ppl']:.3f}", f"{a['ppl'] / b['ppl'] - 1:+.2%}"))
    if "accuracy" in b:
        rows.append(("accuracy", f"{b['accuracy']:.4f}", f"{a['accuracy']:.4f}", f"{a['accuracy'] - b['accuracy']:+.4f}"))
    if "linear_sparsity" in a:
        rows.append(("Linear sparsity", "", f"{a['linear_sparsity']:.3f}", ""))
    return rows


def _print_table(r: dict, console: Console) -> None:
    t = Table(title=f"{r['method']}: before / after")
    for c in ("", "before", "after", "change"):
        t.add_column(c, justify="right" if c else "left")
    for row in _rows(r):
        t.add_row(*row)
    console.print(t)
    colour = "green" if r["gate"]["passed"] else "red"
    console.print(f"[{colour}]gate {'PASS' if r['gate']['passed'] else 'FAIL'}[/]: {r['gate']['detail']}")


def plot(r: dict, out: Path) -> None:
    """compress.png: before/after bars of size, latency and quality."""
    from homeforge.figures import figure

    b, a = r["before"], r["after"]
    quality = "accuracy" if "accuracy" in b else ("ppl" if "ppl" in b else None)
    panels = [("weights on disk (MB)", "weights_bytes", 1e-6), ("latency batch 1 (ms)", "latency_b1_ms", 1),
              ("latency batch 8 (ms)", "latency_b8_ms", 1)]
    if quality:
        panels.append(("perplexity" if quality == "ppl" else "accuracy", quality, 1))
    fig, axes = figure(3 * len(panels), 3.2, ncols=len(panels))
    for ax, (title, key, scale) in zip(axes, panels, strict=True):
        vals = [b[key] * scale, a[key] * scale]
        bars = ax.bar(["before", r["method"]], vals, color=["#999999", "#2a7ab9"])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{r['method']}: gate {'PASS' if r['gate']['passed'] else 'FAIL'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)


def markdown(r: dict) -> str:
    lines = [f"# `{r['method']}` of `{r['source']}`", "", "| | before | after | change |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _rows(r)]
    lines += ["", "![before / after](compress.png)", "",
              f"Gate: {'PASS' if r['gate']['passed'] else 'FAIL'}, {r['gate']['detail']}.",
              f"Latency: median of forward passes over batch x {r.get('latency_seq_len')} tokens on "
              f"{r.get('threads')} threads."]
    return "\n".join(lines) + "\n"

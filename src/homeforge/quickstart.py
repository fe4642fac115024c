"""`homeforge quickstart`: the main job on a built-in default, offline, on a plain CPU.

corpus (stdlib docstrings) -> byte-level BPE tokenizer -> packed shards (dataset artifact)
-> pretrain a small Llama-architecture model -> validation perplexity vs a unigram
baseline -> HF model directory (model artifact) -> sample generations.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from homeforge import artifacts
from homeforge.config import QuickstartConfig
from homeforge.errors import HomeforgeError
from homeforge.progress import progress_bar


def build_dataset(cfg: QuickstartConfig, out: Path, force: bool, console: Console) -> Path:
    """Dataset artifact via `homeforge prepare` on the built-in stdlib-docstring corpus."""
    from homeforge.config import PrepareConfig, PrepTokenizerConfig
    from homeforge.data.prepare import run as prepare

    pcfg = PrepareConfig(
        inputs=["builtin:stdlib-docstrings"],
        output_dir=str(out),
        kind="text",
        max_builtin_chars=cfg.corpus.max_chars,
        split={"val": cfg.corpus.val_fraction, "test": 0.0},
        tokenizer=PrepTokenizerConfig(vocab_size=cfg.tokenizer.vocab_size, min_frequency=cfg.tokenizer.min_frequency),
        workers=1,
        encrypt=cfg.encrypt,
    )
    pcfg.clean.min_chars = cfg.corpus.min_chars
    res = prepare(pcfg, force=force, console=console)
    if not res["skipped"]:
        splits = res["report"]["records"]["splits"]
        if splits["train"] < 20 or splits["val"] < 1:
            raise HomeforgeError(f"the built-in corpus gave only {splits['train']} train / {splits['val']} val documents",
                                 where=str(res["out"]), fix="raise corpus.max_chars or corpus.val_fraction")
    return res["out"]


def planned_steps(cfg: QuickstartConfig) -> int:
    """Steps for ``train_tokens`` (at most ``train.max_steps``)."""
    t = cfg.train
    return max(1, min(t.max_steps, -(-cfg.train_tokens // (t.micro_batch_size * t.grad_accum * t.seq_len))))


def results_line(metrics: dict, seq_len: int) -> str:
    """The headline, honest either way: how the model compares with the unigram baseline."""
    ppl, uni = metrics["val_ppl"], metrics["unigram_ppl"]
    trained = f"after {metrics['steps']} steps, {metrics['samples'] * seq_len:,} tokens"
    if metrics.get("stop_reason") == "time budget":
        trained += " (stopped by the time budget)"
    if ppl < uni:
        return (f"validation perplexity [bold green]{ppl:.1f}[/] vs unigram baseline [bold]{uni:.1f}[/] "
                f"({uni / ppl:.1f}x lower) {trained}")
    return (f"validation perplexity [bold red]{ppl:.1f}[/] is [bold red]worse than[/] the unigram baseline "
            f"[bold]{uni:.1f}[/] {trained}: the model has not learned enough to be useful; give it more time "
            "(--minutes) or tokens (train_tokens=...) on this machine")


def train_model(cfg: QuickstartConfig, data_dir: Path, run_dir: Path, force: bool, console: Console) -> dict:
    """Model artifact ``run_dir/model``: pretrain the preset with the training engine (the same
    ``train_task`` as `homeforge train`), then full validation perplexity vs a unigram baseline."""
    import shutil

    import torch

    from homeforge.data.shards import load_tokens
    from homeforge.evaluate.perplexity import perplexity, unigram_loss
    from homeforge.train.checkpoint import checkpoint_dir
    from homeforge.train.loop import TrainingInterrupted, train_task
    from homeforge.train.methods import build_task

    tcfg = cfg.train.model_copy(update={"method": "pretrain", "data": str(data_dir), "output_dir": str(run_dir),
                                        "encrypt": cfg.encrypt, "max_steps": planned_steps(cfg)})
    model_dir = run_dir / "model"
    plan = artifacts.plan(model_dir, stage="train", config=tcfg.model_dump(mode="json"), inputs={"dataset": tcfg.data},
                          force=force, encrypt=tcfg.encrypt)
    out_p = plan.out
    if plan.up_to_date:
        console.print(f"[green]model up to date[/] {out_p} (same dataset and config; --force retrains)")
        return artifacts.read_manifest(out_p)["metrics"]
    shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)  # a new run: no stale checkpoints to mix in
    task = build_task(tcfg, data_dir)
    if task.val is None:
        raise HomeforgeError(f"the dataset has no validation windows of seq_len={tcfg.seq_len}", where=str(data_dir),
                             fix="lower train.seq_len or raise corpus.max_chars / corpus.val_fraction")
    train_tokens, val_tokens = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
    n_params = task.info["params"]
    console.print(f"model: Llama-architecture preset [bold]{tcfg.model.preset}[/], {n_params / 1e6:.2f}M parameters, "
                  + (f"{torch.get_num_threads()} CPU threads" if not torch.cuda.is_available() else "on CUDA"))

    def final_eval(model) -> dict:  # every validation window, not the engine's sampled eval_batches
        console.print("evaluating validation perplexity")
        total, count = 0.0, 0
        for batch in task.val.eval_batches(tcfg.micro_batch_size):
            out = task.loss_fn(model, batch)
            total, count = total + out.loss_sum.item(), count + out.n_tokens
        val_loss, uni_loss = total / count, unigram_loss(train_tokens, val_tokens, len(task.tokenizer))
        return {"val_loss": val_loss, "val_ppl": perplexity(val_loss), "val_tokens": count,
                "unigram_loss": uni_loss, "unigram_ppl": perplexity(uni_loss), "params": n_params}

    task.final_eval = final_eval
    from homeforge.train.run import step_summary

    with progress_bar(console) as bar:
        bar_task = bar.add_task("training", total=tcfg.max_steps, info="")

        def on_log(state, rec):
            bar.update(bar_task, completed=state.step, total=state.total_steps, info=step_summary(rec))

        try:
            state = train_task(task, tcfg, run_dir, progress=on_log)
        except TrainingInterrupted as exc:
            stopped = HomeforgeError(f"the quickstart stopped on request: {exc.what}",
                                     fix="run `homeforge quickstart` again: the dataset is kept, training starts over")
            stopped.exit_code = exc.exit_code  # 130, like any interrupted command
            raise stopped from None
        bar.update(bar_task, completed=state.step, total=state.step)
    return artifacts.read_manifest(model_dir)["metrics"]


def run(cfg: QuickstartConfig, force: bool = False, console: Console | None = None) -> dict:
    from homeforge.models.generate import generate_text
    from homeforge.models.io import load_causal_lm

    console = console or Console()
    t0 = time.time()
    out = Path(cfg.output_dir).expanduser()
    artifacts.check_writable(out / "data")
    data_dir = build_dataset(cfg, out / "data", force, console)
    model_dir = out / "model"
    metrics = train_model(cfg, data_dir, out, force, console)
    model, tok = load_causal_lm(model_dir)
    console.rule("results")
    console.print(results_line(metrics, cfg.train.seq_len))
    console.rule("samples (temperature 0.7, top-k 40, seed 0)")
    samples = []
    for prompt in cfg.prompts:
        text = generate_text(model, tok, prompt, max_new_tokens=cfg.max_new_tokens, temperature=0.7, top_k=40, seed=0)
        samples.append({"prompt": prompt, "completion": text})
        console.print(f"[bold]{prompt}[/]{text}")
    console.rule("next")
    from homeforge.security.storage import has_encrypted_weights

    how = ("encrypted at rest: homeforge commands read it; `homeforge export --format hf` writes a plain copy"
           if has_encrypted_weights(model_dir) else "loads with transformers' AutoModelForCausalLM, no homeforge needed")
    console.print(
        f"model directory: {model_dir.absolute()}  ({how})\n"
        f"  homeforge generate {model_dir} --prompt 'Return the' --temperature 0.8\n"
        f"  homeforge quickstart train_tokens=3000000 --force   # train longer for a better model\n"
        f"  homeforge config show quickstart           # every setting and its default\n"
        f"  homeforge doctor                           # what this machine can do\n"
        f"done in {time.time() - t0:.0f}s"
    )
    return {"model_dir": str(model_dir), "data_dir": str(data_dir), "metrics": metrics, "samples": samples}

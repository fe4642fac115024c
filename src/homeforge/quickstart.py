"""`homeforge quickstart`: the main job on a built-in default, offline, on a plain CPU.

corpus (stdlib docstrings) -> byte-level BPE tokenizer -> packed shards (dataset artifact)
-> pretrain a small Llama-architecture model -> validation perplexity vs a unigram
baseline -> HF model directory (model artifact) -> sample generations.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from homeforge import artifacts
from homeforge.config import QuickstartConfig
from homeforge.errors import HomeforgeError


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False)


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
    )
    pcfg.clean.min_chars = cfg.corpus.min_chars
    res = prepare(pcfg, force=force, console=console)
    if not res["skipped"]:
        splits = res["report"]["records"]["splits"]
        if splits["train"] < 20 or splits["val"] < 1:
            raise HomeforgeError(f"the built-in corpus gave only {splits['train']} train / {splits['val']} val documents",
                                 where=str(res["out"]), fix="raise corpus.max_chars or corpus.val_fraction")
    return res["out"]


def train_model(cfg: QuickstartConfig, data_dir: Path, out: Path, force: bool, console: Console) -> dict:
    """Model artifact: pretrain the preset on the dataset, evaluate, save an HF directory."""
    import torch

    from homeforge.data.shards import load_tokens
    from homeforge.evaluate.perplexity import mean_loss, perplexity, unigram_loss
    from homeforge.models.io import load_tokenizer, save_model_dir
    from homeforge.models.presets import build_model, count_params, preset_config
    from homeforge.train.data import PackedWindows
    from homeforge.train.loop import train_lm
    from homeforge.train.plots import plot_history

    tcfg = cfg.train
    config = tcfg.model_dump(mode="json")
    out_p, fp, _ = artifacts.begin(out, stage="train", config=config, inputs={"dataset": data_dir})
    if not force and artifacts.is_up_to_date(out_p, fp):
        console.print(f"[green]model up to date[/] {out_p} (same dataset and config; --force retrains)")
        return artifacts.read_manifest(out_p)["metrics"]
    tok = load_tokenizer(data_dir / "tokenizer")
    train_tokens, val_tokens = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
    train_data = PackedWindows(train_tokens, tcfg.seq_len, seed=tcfg.seed)
    val_data = PackedWindows(val_tokens, tcfg.seq_len, shuffle=False)
    if len(train_data) == 0 or len(val_data) == 0:
        raise HomeforgeError(f"the dataset is too small for seq_len={tcfg.seq_len}", where=str(data_dir),
                             fix="lower train.seq_len or raise corpus.max_chars")
    mcfg = preset_config(tcfg.model.preset or "tiny", len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, overrides=tcfg.model.overrides)
    model = build_model(mcfg, seed=tcfg.seed)
    n_params = count_params(model)
    console.print(f"model: Llama-architecture preset [bold]{tcfg.model.preset}[/], {n_params / 1e6:.2f}M parameters, "
                  f"{torch.get_num_threads()} CPU threads" if not torch.cuda.is_available() else "on CUDA")
    with artifacts.write_artifact(out_p, stage="train", config=config, inputs={"dataset": data_dir}, force=True) as art:
        with progress_bar(console) as bar:
            task = bar.add_task("training", total=tcfg.max_steps, info="")

            def on_log(state, rec):
                info = f"loss {rec.get('loss', float('nan')):.3f}"
                if "val_loss" in rec:
                    info += f" val {rec['val_loss']:.3f}"
                if "tokens_per_s" in rec:
                    info += f" {rec['tokens_per_s']:.0f} tok/s"
                bar.update(task, completed=state.step, total=state.total_steps, info=info)

            with art.timed("train"):
                state = train_lm(model, tcfg, train_data, val_data, art.dir, progress=on_log)
            bar.update(task, completed=state.step, total=state.step)
        with art.timed("eval"), console.status("evaluating validation perplexity"):
            val_loss, n_val = mean_loss(model, val_data, tcfg.micro_batch_size)
            uni_loss = unigram_loss(train_tokens, val_tokens, len(tok))
        model.to("cpu")
        save_model_dir(model, tok, art.dir)
        plot_history(state.history, art.dir / "loss.png")
        speeds = [r["tokens_per_s"] for r in state.history if "tokens_per_s" in r]
        art.metrics = {"val_loss": val_loss, "val_ppl": perplexity(val_loss), "val_tokens": n_val,
                       "unigram_loss": uni_loss, "unigram_ppl": perplexity(uni_loss), "steps": state.step,
                       "tokens_seen": state.samples * tcfg.seq_len, "params": n_params,
                       "tokens_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None}
        art.extra.update(kind="causal-lm", architecture="LlamaForCausalLM", dataset=str(data_dir))
    return art.metrics


def run(cfg: QuickstartConfig, force: bool = False, console: Console | None = None) -> dict:
    from homeforge.models.generate import generate_text
    from homeforge.models.io import load_causal_lm

    console = console or Console()
    t0 = time.time()
    out = Path(cfg.output_dir).expanduser()
    artifacts.check_writable(out / "data")
    data_dir = build_dataset(cfg, out / "data", force, console)
    model_dir = out / "model"
    metrics = train_model(cfg, data_dir, model_dir, force, console)
    model, tok = load_causal_lm(model_dir)
    console.rule("results")
    console.print(f"validation perplexity [bold green]{metrics['val_ppl']:.1f}[/] vs unigram baseline "
                  f"[bold]{metrics['unigram_ppl']:.1f}[/] ({metrics['unigram_ppl'] / metrics['val_ppl']:.1f}x lower) "
                  f"after {metrics['steps']} steps, {metrics['tokens_seen']:,} tokens")
    console.rule("samples (temperature 0.7, top-k 40, seed 0)")
    samples = []
    for prompt in cfg.prompts:
        text = generate_text(model, tok, prompt, max_new_tokens=cfg.max_new_tokens, temperature=0.7, top_k=40, seed=0)
        samples.append({"prompt": prompt, "completion": text})
        console.print(f"[bold]{prompt}[/]{text}")
    console.rule("next")
    console.print(
        f"model directory: {model_dir.absolute()}  (loads with transformers' AutoModelForCausalLM, no homeforge needed)\n"
        f"  homeforge generate {model_dir} --prompt 'Return the' --temperature 0.8\n"
        f"  homeforge quickstart --minutes 20          # train longer for a better model\n"
        f"  homeforge config show quickstart           # every setting and its default\n"
        f"  homeforge doctor                           # what this machine can do\n"
        f"done in {time.time() - t0:.0f}s"
    )
    return {"model_dir": str(model_dir), "data_dir": str(data_dir), "metrics": metrics, "samples": samples}

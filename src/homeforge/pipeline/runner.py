"""`homeforge run`: run a pipeline's stages in order, skipping the up-to-date ones; `--init` writes one.

Resuming after Ctrl-C or kill -9 needs nothing of its own: every finished stage left a
complete artifact whose manifest matches, so it is skipped, and train continues from its
last checkpoint when that checkpoint was written under the same config and dataset.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from homeforge.errors import HomeforgeError
from homeforge.pipeline import stages
from homeforge.pipeline.spec import ORDER, Pipeline


def select(pipe: Pipeline, start: str | None, until: str | None) -> list[str]:
    for flag, name in (("--from", start), ("--until", until)):
        if name is not None and name not in pipe.order:
            raise HomeforgeError(f"{flag} {name}: no such stage in this pipeline", where=str(pipe.path),
                                 fix=f"one of: {', '.join(pipe.order)}")
    i = pipe.order.index(start) if start else 0
    j = pipe.order.index(until) + 1 if until else len(pipe.order)
    if i >= j:
        raise HomeforgeError(f"--from {start} comes after --until {until} in this pipeline",
                             fix=f"the order is {' -> '.join(pipe.order)}")
    return pipe.order[i:j]


def plan(pipe: Pipeline, selected: list[str]) -> list[tuple[str, stages.Status]]:
    """What would run and why (`--dry-run`): a stage runs when it is out of date or an upstream stage runs."""
    out, running = [], set()
    for name in selected:
        upstream = [d for d in pipe.order[: pipe.order.index(name)] if d in running and _feeds(pipe, d, name)]
        if upstream:
            st = stages.Status(True, f"{upstream[-1]} runs first (its new artifact is this stage's input)")
        else:
            try:
                st = stages.status(pipe, name)
            except HomeforgeError as exc:
                st = stages.Status(True, f"cannot tell yet: {exc.what}")
        if st.run:
            running.add(name)
        out.append((name, st))
    return out


def _feeds(pipe: Pipeline, up: str, down: str, seen: set | None = None) -> bool:
    """``up``'s artifact reaches ``down`` (directly, or through stages between them)."""
    refs = set(pipe.links.get(down, {}).values())
    if down in ("register", "serve") and "eval" in pipe.order:
        refs.add("eval")
    if down == "serve" and "register" in pipe.order:
        refs.add("register")
    if up in refs:
        return True
    seen = seen or set()
    return any(_feeds(pipe, up, r, seen | {r}) for r in refs if r in ORDER and r not in seen)


def run(pipe: Pipeline, *, start: str | None = None, until: str | None = None, dry_run: bool = False,
        console: Console | None = None) -> dict:
    console = console or Console()
    selected = select(pipe, start, until)
    if dry_run:
        for name, st in plan(pipe, selected):
            verb = "[yellow]would run[/]" if st.run else "[green]skip[/]     "
            console.print(f"{name:<9} {verb} {st.reason}")
        return {"dry_run": True}
    done: dict[str, dict] = {}
    t_all = time.perf_counter()
    for k, name in enumerate(selected, 1):
        upstream_ran = any(done.get(d, {}).get("ran") and _feeds(pipe, d, name) for d in done)
        st = stages.Status(True, "an upstream stage ran") if upstream_ran else stages.status(pipe, name)
        head = f"[bold][{k}/{len(selected)}] {name}[/]"
        if not st.run:
            console.print(f"{head}: [green]skipped[/], {st.reason}")
            done[name] = {"ran": False, "reason": st.reason, "seconds": 0.0}
            continue
        console.rule(f"{head}: {st.reason}")
        t0 = time.perf_counter()
        try:
            stages.run(pipe, name, console)
        except HomeforgeError as exc:
            stopped = stages.StageFailed(f"the pipeline stopped at stage {name}: {exc.what}",
                                         where=exc.where or pipe.where(name), fix=exc.fix)
            stopped.exit_code = exc.exit_code
            raise stopped from None
        done[name] = {"ran": True, "reason": st.reason, "seconds": round(time.perf_counter() - t0, 1)}
    total = time.perf_counter() - t_all
    ran = [n for n, d in done.items() if d["ran"]]
    console.print(f"pipeline done in {total:.0f}s: ran {', '.join(ran) or 'nothing'}"
                  + (f"; skipped {', '.join(n for n in done if n not in ran)}" if len(ran) < len(done) else ""))
    return {"stages": done, "seconds": round(total, 1)}


# --------------------------------------------------------------------------- --init

INIT = """\
# A homeforge pipeline for the documents in {docs}: run it with
#   homeforge run {name}                  (or: homeforge run --config {name})
#   homeforge run {name} --dry-run        what would run and why
#   homeforge run {name} --until eval     stop after a stage; --from STAGE starts at one
# Each section is the config of the command of the same name (`homeforge config show train`, ...).
# A stage whose inputs and config are unchanged is skipped; after Ctrl-C or a crash, run again:
# finished stages are skipped and training continues from its last checkpoint.
workdir: {workdir}            # every stage's artifact goes under it

prepare:                      # folder -> clean, deduplicated, PII-scrubbed, tokenized dataset
  inputs: [{docs}]
  kind: text                  # text, chat (conversations) or classification (text + label)
  split: {{val: 0.1}}          # held-out documents for eval and the gates
  tokenizer: {{vocab_size: 4096}}

train:                        # a small model from scratch on the dataset (data: the prepare stage)
  method: pretrain
  model: {{preset: tiny}}      # debug, tiny, small, 124m; or model: {{path: a local HF model}} with method: lora
  seq_len: 128
  micro_batch_size: 16
  max_steps: 400
  max_minutes: 8              # a wall-clock cap; stops cleanly when reached
  checkpoint: {{every: 50}}    # resume points after an interruption

eval:                         # perplexity, generation metrics, robustness; a failed gate stops the pipeline
  generation: {{max_examples: 16}}
  robustness: {{enabled: false}}
  gates:
    max_ppl: 400              # tighten once you know what your data allows

compress:                     # an int8 copy, refused if perplexity rises by more than 5%
  method: int8-dynamic

export:                       # the model for llama.cpp / Ollama (GGUF), checked against PyTorch
  model: train
  format: gguf

register:                     # a version in the model registry (lineage: data, config, code, eval)
  name: {model_name}
  alias: candidate
  promote_to: champion        # only if it beats the current champion (paired test, p < 0.01)

serve:                        # OpenAI-compatible API on registry:{model_name}@champion (Ctrl-C stops it)
  port: 8000
"""


def init(docs: Path, out: Path, workdir: str | None = None, force: bool = False) -> Path:
    """Write a commented pipeline for a folder of documents."""
    import re

    from homeforge._fs import atomic_write_text

    if not docs.exists():
        raise HomeforgeError(f"{docs} does not exist", fix="give the folder of documents to train on")
    if out.exists() and not force:
        raise HomeforgeError(f"{out} already exists; nothing was changed", where=str(out),
                             fix="choose another file with --output, or pass --force to replace it")
    name = re.sub(r"[^a-z0-9-]+", "-", docs.absolute().name.lower()).strip("-") or "docs"
    atomic_write_text(out, INIT.format(docs=docs.as_posix(), name=out.as_posix(), model_name=name,
                                       workdir=workdir or f"homeforge-runs/{name}"))
    return out

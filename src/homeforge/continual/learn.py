"""`homeforge learn`: the champion + new data -> a candidate that learned without forgetting.

1. the new data: a prepared dataset (``data``), documents prepared with the champion's
   tokenizer (``docs``, through `homeforge prepare`), or captured feedback (``feedback``,
   turned into records and then prepared the same way);
2. the champion's own training data (``old_data``, default: the dataset its manifest names)
   gives the replay buffer, the Fisher information for EWC, and the old held-out split;
3. fine-tuning with the training engine (`homeforge train`'s ``train_task``; full or LoRA)
   on new samples mixed with replayed old ones, the EWC penalty added to the loss;
4. the candidate ``OUT/model`` records both figures in its manifest: forgetting (old
   held-out perplexity after vs before) and gain (new held-out perplexity before vs after),
   stores its Fisher (``ewc/fisher.safetensors``) and is registered (alias ``candidate``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from rich.console import Console

from homeforge.config import LearnConfig
from homeforge.errors import HomeforgeError


def resolve_champion(ref: str | None) -> tuple[Path, str | None]:
    """(model directory, registry name or None) of a directory or a registry reference NAME or NAME@ALIAS."""
    if not ref:
        raise HomeforgeError("no champion given", fix="pass the model to improve: a model directory or a registry "
                                                      "reference NAME or NAME@ALIAS (e.g. docs@champion)")
    p = Path(ref).expanduser()
    if p.is_dir():
        return p.absolute(), None
    if "/" in ref or ref.startswith("."):
        raise HomeforgeError(f"model directory {ref} does not exist", where=ref,
                             fix="pass a model directory (RUN/model) or a registry reference NAME or NAME@ALIAS")
    from homeforge.registry.store import Registry

    res = Registry().resolve(ref)
    return res.path, res.name


def old_dataset_of(model_dir: Path, given: str | None) -> Path:
    if given:
        return Path(given).expanduser().absolute()
    from homeforge import artifacts

    manifest = artifacts.read_manifest(model_dir)
    found = ((manifest.get("input_paths") or {}).get("dataset") or {}).get("path")
    if not found or not Path(found).is_dir():
        raise HomeforgeError(f"{model_dir} does not say where its training data is (or it moved: {found})",
                             where=str(model_dir / "homeforge.json"),
                             fix="pass the dataset the champion was trained on with --old-data DIR")
    return Path(found)


def sources(cfg, ds, n_emb: int):
    """(train, val) sources of a dataset for a causal LM: windows of text, or chat samples."""
    from homeforge.train.methods.pretrain import text_sources
    from homeforge.train.methods.sft import chat_sources

    return chat_sources(cfg, ds, n_emb) if ds.kind == "chat" else text_sources(cfg, ds)


@torch.no_grad()
def heldout_loss(model, src, loss_fn, batch_size: int, max_batches: int) -> float:
    """Mean token loss over the first ``max_batches`` unshuffled batches of ``src``."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in src.eval_batches(batch_size, max_batches):
        out = loss_fn(model, batch)
        total, count = total + out.loss_sum.item(), count + out.n_tokens
    model.train(was)
    return total / max(1, count)


def prepare_new_data(cfg: LearnConfig, champion: Path, run_dir: Path, console: Console) -> Path:
    """The new dataset: given, or prepared from documents / feedback with the champion's tokenizer."""
    given = [x for x in (cfg.data, cfg.docs or None, cfg.feedback) if x]
    if len(given) != 1:
        raise HomeforgeError("learn needs exactly one source of new data" + (f", got {len(given)}" if given else ""),
                             fix="pass one of --data DATASET_DIR, --docs FOLDER or --feedback LOG")
    if cfg.data:
        return Path(cfg.data).expanduser().absolute()
    from homeforge import scratch
    from homeforge.config import PrepareConfig
    from homeforge.data.prepare import run as prepare

    inputs = [str(Path(d).expanduser().absolute()) for d in cfg.docs]
    kind, tmp = "text", None
    if cfg.feedback:  # scrubbed records in a private temp folder (memory-backed when there is one), removed after
        from homeforge.continual.feedback import export_records

        tmp = scratch.memory_dir("feedback") or scratch.private_dir(run_dir, "feedback")
        records, n = export_records(Path(cfg.feedback).expanduser(), tmp / "feedback.jsonl", cfg.min_rating)
        console.print(f"feedback: {n} exchanges taken from {cfg.feedback}")
        inputs, kind = [str(records)], "chat"
    pcfg = PrepareConfig(inputs=inputs, kind=kind, output_dir=str(run_dir / "data"), encrypt=cfg.encrypt,
                         tokenizer={"from_dir": str(champion)}, split={"val": 0.15, "salt": "learn"}, workers=1,
                         clean={"min_chars": 1, "min_words": 1}, dedup={"near": False})
    try:
        return Path(prepare(pcfg, console=console)["out"])
    finally:
        if tmp is not None:
            scratch.release(tmp)


def learn(cfg: LearnConfig, *, force: bool = False, console: Console | None = None) -> dict:
    """Run `homeforge learn`; returns the candidate's figures (see the module docstring)."""
    from homeforge.continual import ewc as ewc_mod
    from homeforge.continual.replay import BufferSource, ReplaySource
    from homeforge.train.loop import train_task
    from homeforge.train.methods import build_task
    from homeforge.train.methods.common import check_tokenizers_match, open_dataset
    from homeforge.train.run import prepare_run_dir

    console = console or Console()
    champion, reg_name = resolve_champion(cfg.model)
    run_dir = Path(cfg.output_dir).expanduser().absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    new_data = prepare_new_data(cfg, champion, run_dir, console)
    old_data = old_dataset_of(champion, cfg.old_data)
    method = "lora" if cfg.mode == "lora" else ("sft" if open_dataset(new_data, "lora").kind == "chat" else "pretrain")
    tcfg = cfg.train.model_copy(update={"method": method, "data": str(new_data), "output_dir": str(run_dir),
                                        "encrypt": cfg.encrypt, "model": {"path": str(champion), "preset": None}})
    tcfg = type(tcfg).model_validate(tcfg.model_dump())
    try:
        prepare_run_dir(run_dir, None, force, True)
    except HomeforgeError:
        raise HomeforgeError(f"{run_dir} already holds the checkpoints of an earlier learn run", where=str(run_dir),
                             fix="choose another --output, or pass --force to start over there") from None
    task = build_task(tcfg, new_data)
    if task.val is None:
        raise HomeforgeError(f"the new data {new_data} has no validation split, so the gain cannot be measured",
                             where=str(new_data), fix="prepare it with split.val > 0 (e.g. 0.15)")
    old_ds = open_dataset(old_data, "lora")
    n_emb = task.model.get_input_embeddings().num_embeddings
    check_tokenizers_match(old_ds, task.tokenizer, old_data, n_emb)
    old_train, old_val = sources(tcfg, old_ds, n_emb)
    if old_val is None:
        raise HomeforgeError(f"the old data {old_data} has no validation split, so forgetting cannot be measured",
                             where=str(old_data), fix="pass a dataset with a val split as --old-data")
    base_loss = task.loss_fn
    mb, nb = tcfg.micro_batch_size, cfg.eval_batches
    before = {"old": heldout_loss(task.model, old_val, base_loss, mb, nb),
              "new": heldout_loss(task.model, task.val, base_loss, mb, nb)}
    console.print(f"champion {champion}: old held-out ppl {math.exp(before['old']):.2f}, "
                  f"new held-out ppl {math.exp(before['new']):.2f}")
    fisher_old = None
    if cfg.ewc.lam > 0 or cfg.ewc.decay > 0:
        fisher_old = ewc_mod.load_fisher(champion) if cfg.ewc.reuse else None
        if fisher_old is None:
            console.print(f"estimating the Fisher information on {cfg.ewc.samples} old sequences")
            fisher_old = ewc_mod.estimate_fisher(task.model, old_train.eval_batches(mb), base_loss, cfg.ewc.samples)
    if cfg.ewc.lam > 0:
        task.loss_fn = ewc_mod.EWC(task.model, fisher_old, cfg.ewc.lam).wrap(base_loss)
    if cfg.replay.ratio > 0:
        task.train = ReplaySource(task.train, BufferSource(old_train, cfg.replay.buffer, tcfg.seed), cfg.replay.ratio)

    def final_eval(model) -> dict:
        after = {"old": heldout_loss(model, old_val, base_loss, mb, nb),
                 "new": heldout_loss(model, task.val, base_loss, mb, nb)}
        return figures(before, after)

    task.final_eval = final_eval
    save = task.save_final

    def save_final(model, out_dir, tokenizer) -> None:
        save(model, out_dir, tokenizer)
        if fisher_old is not None:  # the candidate's own Fisher: the old one decayed plus the new data's
            new_f = ewc_mod.estimate_fisher(model, task.val.eval_batches(mb), base_loss, cfg.ewc.samples)
            ewc_mod.save_fisher(ewc_mod.combine(fisher_old, new_f, cfg.ewc.decay), out_dir,
                                {"decay": cfg.ewc.decay, "samples": cfg.ewc.samples})

    task.save_final = save_final
    task.info.update(continual={"champion": str(champion), "old_data": str(old_data), "new_data": str(new_data),
                                "replay": cfg.replay.model_dump(), "ewc": cfg.ewc.model_dump(), "mode": cfg.mode})
    from homeforge.progress import progress_bar
    from homeforge.train.run import step_summary

    with progress_bar(console) as bar:
        bar_task = bar.add_task("learning", total=tcfg.max_steps, info="")

        def on_log(state, rec):
            bar.update(bar_task, completed=state.step, total=state.total_steps, info=step_summary(rec))

        train_task(task, tcfg, run_dir, progress=on_log)
    from homeforge import artifacts

    model_dir = run_dir / "model"
    result = {**artifacts.read_manifest(model_dir)["metrics"], "model": str(model_dir)}
    name = cfg.name or reg_name
    if name:
        from homeforge.registry.store import Registry

        version, _ = Registry().register(model_dir, name, alias=cfg.alias)
        result.update(registered=name, version=version["version"], alias=cfg.alias)
    from homeforge.security.audit import AuditLog

    AuditLog().append({"event": "learn", "champion": str(champion), "candidate": str(model_dir),
                       "registered": result.get("registered"), "version": result.get("version"),
                       **{k: result[k] for k in ("forgetting", "gain") if k in result}})
    return result


def figures(before: dict, after: dict) -> dict:
    """Forgetting (old held-out perplexity increase) and gain (new held-out perplexity decrease)."""
    ppl = {f"{k}_ppl_{w}": math.exp(v[k]) for w, v in (("before", before), ("after", after)) for k in ("old", "new")}
    return {**ppl, "forgetting": ppl["old_ppl_after"] - ppl["old_ppl_before"],
            "gain": ppl["new_ppl_before"] - ppl["new_ppl_after"],
            "forgetting_rel": ppl["old_ppl_after"] / ppl["old_ppl_before"] - 1,
            "gain_rel": 1 - ppl["new_ppl_after"] / ppl["new_ppl_before"]}

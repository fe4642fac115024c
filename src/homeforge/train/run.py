"""``homeforge train``: config -> method task -> engine -> run directory, with a progress bar.

Run directory (``output_dir``)::

    checkpoints/step-NNNNNNNN/  last K checkpoints (see ``train.checkpoint``)
    checkpoints/best/           the checkpoint with the best validation loss
    metrics.jsonl               one record per logged step
    tensorboard/                event files (tracking.tensorboard)
    mlflow.db                   local MLflow store (tracking.mlflow)
    loss.png                    the loss curves
    model/                      the final model artifact (HF directory + homeforge.json)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from homeforge.config import TrainConfig
from homeforge.errors import HomeforgeError
from homeforge.train import checkpoint as ck


def step_summary(rec: dict) -> str:
    """One line for the progress bar: loss, validation loss, throughput, MFU (when it is known)."""
    text = f"loss {rec['loss']:.3f}" + (f" val {rec['val_loss']:.3f}" if "val_loss" in rec else "") \
        + (f" val acc {rec['val_accuracy']:.3f}" if "val_accuracy" in rec else "")
    text += f" {rec['tokens_per_s']:,.0f} tok/s"
    if "samples_per_s" in rec:
        text += f" {rec['samples_per_s']:,.1f} samples/s"
    return text + (f" MFU {rec['mfu']:.0%}" if rec.get("mfu") is not None else "")


def prepare_run_dir(run_dir: Path, resume: str | None, force: bool, is_main: bool) -> Path | None:
    """Resolve ``--resume``; refuse to start over an existing run unless ``--force`` (nothing overwritten)."""
    if resume is not None:
        return ck.resolve_resume(run_dir, resume)
    existing = ck.step_checkpoints(run_dir) or (run_dir / "checkpoints" / "best").is_dir()
    if existing and not force:
        raise HomeforgeError(f"{run_dir} already holds checkpoints of an earlier run", where=str(run_dir),
                             fix="continue it with --resume latest, choose another --output, or pass --force to "
                                 "delete its checkpoints and start over")
    if existing and is_main:
        shutil.rmtree(run_dir / "checkpoints")
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    return None


def model_up_to_date(cfg: TrainConfig) -> bool:
    """True when ``RUN/model`` is the artifact this config and dataset would write (the manifest's fingerprint,
    as ``save_final_model`` records it): training again would give nothing new."""
    from homeforge import artifacts

    out = Path(cfg.output_dir).expanduser().absolute() / "model"
    inputs = {"dataset": artifacts.hash_input(cfg.data)} if cfg.data else {}
    fp = artifacts.fingerprint("train", cfg.model_dump(mode="json"), inputs, cfg.encrypt)
    return artifacts.is_up_to_date(out, fp)


def resumable(cfg: TrainConfig) -> Path | None:
    """The run directory's latest checkpoint when it was written under exactly this config and from the same
    dataset content (so continuing it gives the run this config asks for), else None."""
    from homeforge.config import flatten

    run_dir = Path(cfg.output_dir).expanduser().absolute()
    latest = ck.latest_checkpoint(run_dir)
    if latest is None:
        return None
    try:
        saved, meta = ck.read_config(latest), ck.read_meta(latest)
    except (HomeforgeError, OSError, ValueError):
        return None
    if cfg.data:  # the same dataset content, not only the same path
        from homeforge import artifacts

        if meta.get("dataset") != artifacts.hash_input(cfg.data):
            return None
    defaults = TrainConfig().model_dump(mode="json")
    return latest if {**flatten(defaults), **flatten(saved)} == flatten(cfg.model_dump(mode="json")) else None


def run(cfg: TrainConfig, *, resume: str | None = None, force: bool = False, console: Console | None = None) -> dict:
    """Train as configured (one process or one torchrun rank); returns the final metrics."""
    from homeforge.train.distributed import init_distributed, shutdown
    from homeforge.train.loop import final_metrics, train_task
    from homeforge.train.methods import build_task

    console = console or Console()
    info = init_distributed(cfg.distributed.backend)
    try:
        run_dir = Path(cfg.output_dir).expanduser().absolute()
        resume_path = prepare_run_dir(run_dir, resume, force, info.is_main)
        if resume_path is not None:  # refuse a foreign checkpoint before building anything
            ck.check_resume_config(resume_path, ck.read_config(resume_path), cfg.model_dump(mode="json"),
                                   defaults=TrainConfig().model_dump(mode="json"))
        info.barrier()
        task = build_task(cfg)
        if info.is_main:
            n = sum(p.numel() for p in task.model.parameters())
            n_train = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
            console.print(f"[bold]{cfg.method}[/]: {type(task.model).__name__}, {n / 1e6:.2f}M parameters "
                          f"({n_train / 1e6:.2f}M trainable), {info.world} process(es) on {info.device.type}"
                          + (f", resuming from {resume_path}" if resume_path else ""))
        if info.is_main:
            from homeforge.progress import progress_bar

            with progress_bar(console) as bar:
                bar_task = bar.add_task("training", total=cfg.max_steps, info="")

                def on_log(state, rec):
                    bar.update(bar_task, completed=state.step, total=state.total_steps, info=step_summary(rec))

                state = train_task(task, cfg, run_dir, resume=resume_path, info=info, progress=on_log)
            console.print(f"done: {state.step} steps ({state.stop_reason}); model in [bold]{run_dir / 'model'}[/], "
                          f"curves in {run_dir / 'loss.png'}")
        else:
            state = train_task(task, cfg, run_dir, resume=resume_path, info=info)
        return final_metrics(state)
    finally:
        shutdown()

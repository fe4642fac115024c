"""Training checkpoints: atomic, with the resolved config beside them, last K kept, best kept.

Layout of ``RUN/checkpoints/step-00000100/`` (``best/`` is the same)::

    model.safetensors   trainable parameters (all of them for full training; the adapter for LoRA)
    trainer.pt          optimizer, lr scheduler, grad scaler, run state (step, data position, ...)
    rng-rank{R}.pt      python / numpy / torch (/ cuda) RNG states of every rank
    config.yaml         the resolved training config
    meta.json           step, samples, losses, config hash, world size (written last)

A checkpoint is built in ``.tmp-NAME`` and renamed into place, so a crash leaves either
the old set or the new one, never a half-written directory; ``meta.json`` marks a
complete one. Model and optimizer states go through ``torch.distributed.checkpoint``'s
full-state-dict helpers, so one code path serves a single process, DDP and FSDP2.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from homeforge._fs import fsync_dir, fsync_tree, sha256_json, swap_dir
from homeforge.errors import HomeforgeError

STEP_RE = re.compile(r"^step-(\d{8})$")
# settings that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = ("max_minutes", "log_every", "threads", "output_dir", "data", "tracking", "checkpoint.every",
                     "checkpoint.keep")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_hash(config: dict) -> str:
    keep = {k: v for k, v in _flat(config).items() if not k.startswith(RESUMABLE_CHANGES)}
    return sha256_json(keep)


def check_resume_config(ckpt: Path, saved: dict, current: dict, defaults: dict | None = None) -> None:
    """Refuse to resume a checkpoint written under a different config (listing what differs).

    Settings added to the schema after the checkpoint was written count as their ``defaults``.
    """
    a, b = {**_flat(defaults or {}), **_flat(saved)}, _flat(current)
    diff = [k for k in sorted(set(a) | set(b)) if not k.startswith(RESUMABLE_CHANGES) and a.get(k) != b.get(k)]
    if diff:
        shown = "; ".join(f"{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in diff[:8])
        raise HomeforgeError(
            f"cannot resume: the checkpoint was written with a different training config ({shown})",
            where=str(ckpt / "config.yaml"),
            fix="resume with the same config (copy it from the checkpoint's config.yaml), or start a new run "
                "in another output directory",
        )


# --------------------------------------------------------------------------- rng


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- listing


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "trainer.pt").is_file()


def step_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints in the order they were written, oldest first.

    Written order, not step order: after resuming from an earlier checkpoint, the newest
    checkpoint of the resumed run is the latest, not a higher step left from before.
    """
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: ((p / "meta.json").stat().st_mtime_ns, int(STEP_RE.match(p.name).group(1))))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = step_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """``latest`` -> the newest complete checkpoint of ``run_dir``; otherwise a checkpoint path."""
    if resume == "latest":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise HomeforgeError(f"--resume latest: {checkpoint_dir(run_dir)} holds no complete checkpoint",
                                 where=str(run_dir),
                                 fix="check --output / output_dir, or start the run without --resume")
        return found
    p = Path(resume).expanduser()
    if not p.is_dir() or not is_complete(p):
        raise HomeforgeError(f"--resume {resume}: not a complete homeforge checkpoint (no meta.json / trainer.pt)",
                             where=str(p), fix="pass a RUN/checkpoints/step-NNNNNNNN directory, or --resume latest")
    return p


# --------------------------------------------------------------------------- save / load


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def save_checkpoint(run_dir: Path, name: str, *, model: torch.nn.Module, optimizer, trainer: dict, config: dict,
                    meta: dict, rank: int = 0, world: int = 1, barrier=lambda: None) -> Path | None:
    """Write checkpoint ``name`` atomically; every rank must call it (collectives inside)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = set(trainable_names(model))
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    root = checkpoint_dir(run_dir)
    final = root / name
    tmp = root / f".tmp-{name}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    barrier()
    if rank != 0:
        barrier()
        return None
    try:
        weights = {k: v.detach().contiguous() for k, v in msd.items() if k in names}
        save_file(weights, str(tmp / "model.safetensors"))
        torch.save({**trainer, "optimizer": osd}, tmp / "trainer.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        meta = {**meta, "name": name, "world_size": world, "config_hash": config_hash(config),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if config.get("encrypt"):  # weights, optimizer, RNG state encrypted
            from homeforge.security import atrest, keys

            atrest.encrypt_tree(tmp, keys.load_key(required=True))
        fsync_tree(tmp)
        swap_dir(tmp, final)  # only "best" is ever replaced
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        barrier()
    return final


def prune(run_dir: Path, keep: int) -> None:
    for old in step_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer, rank: int = 0) -> dict:
    """Restore model, optimizer and this rank's RNG from ``path``; returns the trainer dict."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from homeforge.security.storage import load_safetensors, torch_load  # plain or encrypted files

    weights = load_safetensors(path / "model.safetensors")
    missing = sorted(set(trainable_names(model)) - set(weights))
    if missing:
        raise HomeforgeError(f"checkpoint {path} does not match the model: {len(missing)} trainable parameters are "
                             f"missing (e.g. {missing[0]})", where=str(path),
                             fix="resume with the model/method the checkpoint was written with")
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=opts)
    trainer = torch_load(path / "trainer.pt", map_location="cpu", weights_only=False)
    set_optimizer_state_dict(model, optimizer, trainer.pop("optimizer"), options=StateDictOptions(full_state_dict=True))
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch_load(rng_file, map_location="cpu", weights_only=False))
    return trainer


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Only the trained weights of checkpoint ``path`` (every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from homeforge.security.storage import load_safetensors  # plain or encrypted files

    set_model_state_dict(model, load_safetensors(path / "model.safetensors"),
                         options=StateDictOptions(full_state_dict=True, strict=False))


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text(encoding="utf-8"))


def read_config(path: Path) -> dict:
    return yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))

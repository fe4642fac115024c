"""Training checkpoints: atomic, with the resolved config beside them, last K kept, best kept.

Layout of ``RUN/checkpoints/step-00000100/`` (``best/`` is the same)::

    model.safetensors   trainable parameters (all of them for full training; the adapter for LoRA)
    trainer.pt          optimizer, lr scheduler, grad scaler, run state (step, data position, ...)
    rng-rank{R}.pt      python / numpy / torch (/ cuda) RNG states of every rank
    config.yaml         the resolved training config
    meta.json           step, samples, losses, config hash, world size
    homeforge.json      the checkpoint's own manifest (written last): every file above hashed,
                        the config, sealed like an artifact's (``integrity``)

A checkpoint is built in a private (0700) ``.tmp-NAME`` and renamed into place, so a crash
leaves either the old set or the new one, never a half-written directory. With ``encrypt``
every data file is encrypted from memory (nothing of it is written in the clear). Resuming
and reading a checkpoint's config or weights check every file against its manifest first: a
flipped byte, a deleted RNG file or an edited config.yaml is refused with the file named.
Model and optimizer states go through ``torch.distributed.checkpoint``'s full-state-dict
helpers, so one code path serves a single process, DDP and FSDP2.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from homeforge import integrity, scratch
from homeforge._fs import fsync_dir, fsync_tree, sha256_json, swap_dir
from homeforge.errors import HomeforgeError

MANIFEST = integrity.MANIFEST

STEP_RE = re.compile(r"^step-(\d{8})$")
# settings that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = ("max_minutes", "log_every", "threads", "output_dir", "data", "tracking", "checkpoint.every",
                     "checkpoint.keep")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    from homeforge.config import flatten

    return flatten(d, prefix)


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


def verify_checkpoint(path: Path, rels: list[str] | None = None) -> dict | None:
    """Check a checkpoint (or some of its files) against its manifest before use; its manifest or None
    with ``--no-verify``. A checkpoint without a manifest (older homeforge) is refused."""
    if not integrity.verify_enabled():
        integrity.note_skipped(path)  # for the command's audit line
        return None
    if not (path / MANIFEST).is_file():
        raise HomeforgeError(f"checkpoint {path} has no manifest ({MANIFEST}): it was written by an older homeforge, "
                             "or the manifest was deleted, so its files cannot be checked", where=str(path),
                             fix="start the run again, or accept it unchecked with `homeforge --no-verify train "
                                 "--resume ...` (recorded in the audit log)")
    return integrity.check_now(path, rels)


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


def running_stat_names(model: torch.nn.Module) -> list[str]:
    """Buffers that training changes besides the parameters: batch-norm running statistics (image backbones)."""
    return [n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in ("running_mean", "running_var",
                                                                              "num_batches_tracked")]


def _writer(encrypt: bool):
    """``write(path, data: bytes)``: plain, or encrypted from memory (no plaintext on disk)."""
    if not encrypt:
        return lambda path, data: Path(path).write_bytes(data)
    from homeforge.security import crypto, keys

    key = keys.load_key(required=True)
    return lambda path, data: crypto.write_encrypted(path, data, key)


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(run_dir: Path, name: str, *, model: torch.nn.Module, optimizer, trainer: dict, config: dict,
                    meta: dict, rank: int = 0, world: int = 1, barrier=lambda: None) -> Path | None:
    """Write checkpoint ``name`` atomically; every rank must call it (collectives inside)."""
    from safetensors.torch import save
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = set(trainable_names(model)) | set(running_stat_names(model))
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    root = checkpoint_dir(run_dir)
    final = root / name
    tmp = root / f".tmp-{name}"  # one name every rank knows
    encrypt = bool(config.get("encrypt"))
    write = _writer(encrypt)
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(mode=0o700)
        os.chmod(tmp, 0o700)
        scratch.register(tmp)
    barrier()
    write(tmp / f"rng-rank{rank}.pt", _torch_bytes(rng_state()))
    barrier()
    if rank != 0:
        barrier()
        return None
    try:
        weights = {k: v.detach().contiguous() for k, v in msd.items() if k in names}
        write(tmp / "model.safetensors", save(weights))
        write(tmp / "trainer.pt", _torch_bytes({**trainer, "optimizer": osd}))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        meta = {**meta, "name": name, "world_size": world, "config_hash": config_hash(config),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        _write_manifest(tmp, config, meta, encrypt)
        os.chmod(tmp, 0o755)
        fsync_tree(tmp)
        swap_dir(tmp, final)  # only "best" is ever replaced
        fsync_dir(root)
        scratch.unregister(tmp)
    except BaseException:
        scratch.release(tmp)
        raise
    finally:
        barrier()
    return final


def _write_manifest(tmp: Path, config: dict, meta: dict, encrypt: bool) -> None:
    """The checkpoint's own sealed manifest: every file hashed, the config and the run state it holds."""
    from homeforge.artifacts import ArtifactWriter

    w = ArtifactWriter(out=tmp, dir=tmp, stage="checkpoint", config=config, inputs={}, fingerprint=meta["config_hash"])
    w.metrics = {k: meta.get(k) for k in ("step", "samples", "loss", "best_val")}
    w.extra["checkpoint"] = {"name": meta["name"], "world_size": meta["world_size"]}
    if encrypt:
        from homeforge.security import atrest, keys

        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.iterdir() if atrest.should_encrypt(p.name))
        w.extra["encryption"] = {"format": atrest.FORMAT, "key_id": keys.load_key(required=True).key_id, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(w.manifest(), indent=2, default=str), encoding="utf-8")


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

    verify_checkpoint(path)  # every file, before any of it is used
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

    verify_checkpoint(path, ["model.safetensors"])
    set_model_state_dict(model, load_safetensors(path / "model.safetensors"),
                         options=StateDictOptions(full_state_dict=True, strict=False))


def read_manifest_of(path: Path) -> dict | None:
    """A checkpoint's manifest as written (checked by ``verify_checkpoint``), None if it has none."""
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_meta(path: Path) -> dict:
    verify_checkpoint(path, ["meta.json"])
    return json.loads((path / "meta.json").read_text(encoding="utf-8"))


def read_config(path: Path) -> dict:
    """The config a checkpoint was written with (checked against its manifest: an edited copy is refused)."""
    verify_checkpoint(path, ["config.yaml"])
    return yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))

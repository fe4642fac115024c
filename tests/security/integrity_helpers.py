"""Shared helpers for the integrity tests: tiny artifacts made by the real writers, damage, an in-process CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from homeforge import artifacts, integrity


def flip(path: Path, at: float = 0.5) -> None:
    """Flip one bit of one byte (the file keeps its size)."""
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * at)] ^= 0x01
    path.write_bytes(bytes(raw))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_json(path: Path, **changes) -> None:
    """A hand edit of a JSON file (the manifest's seal is left as it was)."""
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc, indent=2))


def forge_manifest(root: Path, **changes) -> None:
    """An attacker's edit of a manifest: the digest recomputed, no key, so no valid HMAC."""
    mf = root / artifacts.MANIFEST
    doc = json.loads(mf.read_text())
    doc.update(changes)
    doc = integrity.seal(doc, key=None)
    mf.write_text(json.dumps(doc, indent=2))


def tiny_model_artifact(out: Path, tokenizer, *, encrypt: bool = False) -> Path:
    """A `train`-stage model artifact: a 2-layer Llama with the tiny tokenizer, written by the real writer."""
    from homeforge.models.io import save_model_dir
    from homeforge.models.presets import build_model, preset_config

    model = build_model(preset_config("debug", len(tokenizer), eos_token_id=tokenizer.eos_token_id), seed=0)
    with artifacts.write_artifact(out, stage="train", config={"preset": "debug"}, encrypt=encrypt) as art:
        save_model_dir(model, tokenizer, art.dir)
        art.metrics = {"val_loss": 1.0}
    return out


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``homeforge ARGS`` in this process through the real entry point (error handling, audit line)."""
    from homeforge import cli, integrity

    old = sys.argv
    sys.argv = ["homeforge", *map(str, args)]
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
        integrity.set_verify(True)
    out = capsys.readouterr()
    return code, out.out, out.err


def keys_init(home: Path):
    """What `homeforge keys init` does: the data key, and the audit key created under the log's lock."""
    from homeforge.security import audit, keys

    data = keys.init_key()
    created = audit.AuditLog(key=None).create_key()
    assert os.stat(home / "keys" / "audit.key").st_mode & 0o077 == 0
    return data, created

"""Checkpoints carry a sealed manifest of their own; resume checks it (issue 11: a flipped byte in trainer.pt,
a deleted rng-rank0.pt and an edited config.yaml all resumed silently before)."""

from __future__ import annotations

import json
import shutil
import stat
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from engine_task import make_cfg, make_task  # noqa: E402
from integrity_helpers import edit_json, flip, run_cli, truncate  # noqa: E402

from homeforge import integrity  # noqa: E402
from homeforge.integrity import IntegrityError  # noqa: E402
from homeforge.train import checkpoint as ck  # noqa: E402
from homeforge.train.loop import train_task  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckrun")
    cfg = make_cfg(tmp, "max_steps=8", "checkpoint.every=4", "eval_every=100", "checkpoint.keep=2")
    train_task(make_task(cfg), cfg, tmp)
    return tmp


@pytest.fixture
def run(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", out / "checkpoints")
    return out


def resume(run: Path, *overrides: str):
    cfg = make_cfg(run, "max_steps=8", "checkpoint.every=4", "eval_every=100", "checkpoint.keep=2", *overrides)
    return train_task(make_task(cfg), cfg, run, resume=run / "checkpoints" / "step-00000004")


def test_checkpoint_has_a_sealed_manifest_of_every_file(run):
    ckpt = run / "checkpoints" / "step-00000004"
    m = json.loads((ckpt / "homeforge.json").read_text())
    assert m["stage"] == "checkpoint" and m["metrics"]["step"] == 4 and m["seal"]["digest"]
    assert set(m["files"]) == {"model.safetensors", "trainer.pt", "rng-rank0.pt", "config.yaml", "meta.json"}
    assert m["config"]["optim"]["lr"] == 0.003
    assert integrity.check_now(ckpt)["content_hash"] == m["content_hash"]


CASES = {
    "flipped byte in trainer.pt": (lambda c: flip(c / "trainer.pt"), "trainer.pt does not match"),
    "deleted rng-rank0.pt": (lambda c: (c / "rng-rank0.pt").unlink(), "rng-rank0.pt is missing"),
    "truncated weights": (lambda c: truncate(c / "model.safetensors"), "model.safetensors is truncated"),
    "edited config.yaml": (lambda c: (c / "config.yaml").write_text(  # lr 0.003 -> 0.3, same size
        (c / "config.yaml").read_text().replace("lr: 0.003", "lr: 0.300")), "config.yaml does not match"),
    "edited manifest": (lambda c: edit_json(c / "homeforge.json", metrics={"step": 9}), "edited after it was written"),
    "edited meta.json": (lambda c: edit_json(c / "meta.json", world_size=1, step=5), "meta.json does not match"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_checkpoint_is_not_resumed(run, case):
    damage, words = CASES[case]
    ckpt = run / "checkpoints" / "step-00000004"
    damage(ckpt)
    with pytest.raises(IntegrityError) as err:
        resume(run)
    assert words in err.value.render() and str(ckpt) in err.value.render()
    assert not (run / "model").exists()


def test_edited_config_yaml_refused_by_the_cli_resume(run, capsys, home):
    """The CLI continues with the checkpoint's own config.yaml: an edited copy must never become the run's config."""
    ckpt = run / "checkpoints" / "step-00000004"
    shutil.rmtree(run / "checkpoints" / "step-00000008")
    text = (ckpt / "config.yaml").read_text()
    (ckpt / "config.yaml").write_text(text.replace("lr: 0.003", "lr: 0.300"))  # same size: only the hash can tell
    code, _, err = run_cli(capsys, "train", "--output", run, "--resume", "latest")
    assert code == 2 and "config.yaml does not match its recorded hash" in err and "Traceback" not in err


def test_resumed_run_records_the_config_it_used(run):
    resume(run)
    m = json.loads((run / "model" / "homeforge.json").read_text())
    assert m["config"]["optim"]["lr"] == 0.003
    (entry,) = m["resumed_from"]
    assert entry["step"] == 4 and entry["checkpoint"].endswith("step-00000004")
    assert entry["content_hash"] == json.loads((run / "checkpoints" / "step-00000004" / "homeforge.json").read_text()
                                               )["content_hash"]


def test_checkpoint_without_manifest_refused_unless_no_verify(run):
    ckpt = run / "checkpoints" / "step-00000004"
    (ckpt / "homeforge.json").unlink()  # as written by an older homeforge (or the manifest deleted)
    with pytest.raises(Exception, match="has no manifest") as err:
        resume(run)
    assert "--no-verify" in err.value.render()
    integrity.set_verify(False)
    try:
        resume(run)
    finally:
        integrity.set_verify(True)
    assert (run / "model" / "homeforge.json").is_file() and str(ckpt) in integrity.skipped()


def test_checkpoint_is_built_private_and_encrypted_from_memory(tmp_path, monkeypatch, home):
    from homeforge.security import crypto, keys

    keys.init_key()
    seen = {}
    real = ck._write_manifest

    def spy(tmp, config, meta, encrypt):
        seen["mode"] = stat.S_IMODE(tmp.stat().st_mode)
        seen["plain"] = [p.name for p in tmp.iterdir() if p.suffix in (".pt", ".safetensors") and not crypto.is_encrypted(p)]
        return real(tmp, config, meta, encrypt)

    monkeypatch.setattr(ck, "_write_manifest", spy)
    cfg = make_cfg(tmp_path, "max_steps=2", "checkpoint.every=2", "eval_every=100", "encrypt=true")
    train_task(make_task(cfg), cfg, tmp_path)
    assert seen["mode"] == 0o700 and seen["plain"] == []  # never a plaintext data file, even before the swap
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    m = json.loads((ckpt / "homeforge.json").read_text())
    assert sorted(m["encryption"]["files"]) == ["model.safetensors", "rng-rank0.pt", "trainer.pt"]
    assert yaml.safe_load((ckpt / "config.yaml").read_text())["encrypt"] is True
    integrity.check_now(ckpt)

"""Typed command-line flags reach the config as the values they are (never re-parsed as YAML)."""

from pathlib import Path

from typer.testing import CliRunner

from homeforge.cli import app
from homeforge.cli._common import load
from homeforge.config import PrepareConfig, QuickstartConfig, ServeConfig, TrainConfig


def test_typed_flags_are_not_yaml():
    cfg = load(None, ServeConfig, None, None, model_dir=Path("models/m #2"), host="::", model_name="yes")
    assert cfg.model_dir == "models/m #2" and cfg.host == "::" and cfg.model_name == "yes"
    cfg = load(None, TrainConfig, None, ["seed=3"], output_dir=Path("runs/exp #2"), data="null")
    assert cfg.output_dir == "runs/exp #2" and cfg.data == "null" and cfg.seed == 3
    cfg = load(None, QuickstartConfig, None, ["train.max_steps=9"], train__model__preset="debug", output_dir=None)
    assert cfg.train.model.preset == "debug" and cfg.train.max_steps == 9
    assert cfg.output_dir == QuickstartConfig().output_dir  # None = flag not given


def test_prepare_paths_with_hash_and_colons(tmp_path):
    src = tmp_path / "notes #2"
    src.mkdir()
    for i, text in enumerate(["Alpha beta gamma delta epsilon zeta eta theta iota kappa lambda.",
                              "The quick brown fox jumps over the lazy dog near the river bank."]):
        (src / f"{i}.txt").write_text(text)
    out = tmp_path / "data #2::x"
    r = CliRunner().invoke(app, ["prepare", str(src), "-o", str(out), "--workers", "1", "tokenizer.vocab_size=300",
                                 "clean.min_chars=5", "split.val=0"])
    assert r.exit_code == 0, r.output
    assert (out / "homeforge.json").is_file()
    cfg_inputs = __import__("json").loads((out / "homeforge.json").read_text())["inputs"]
    assert any("0.txt" in k for k in cfg_inputs)


def test_global_encrypt_flag_sets_the_stage_config(tmp_path, monkeypatch):
    import typer

    ctx = typer.Context(typer.main.get_command(app))
    ctx.obj = {"encrypt": True}
    assert load(ctx, PrepareConfig, None, None).encrypt is True
    ctx.obj = {"encrypt": False}
    monkeypatch.delenv("HOMEFORGE_ENCRYPT", raising=False)
    assert load(ctx, PrepareConfig, None, None).encrypt is False
    monkeypatch.setenv("HOMEFORGE_ENCRYPT", "1")
    assert load(ctx, PrepareConfig, None, None).encrypt is True


def test_config_show_lists_stages():
    r = CliRunner().invoke(app, ["config", "show"])
    assert r.exit_code == 0 and "prepare" in r.output and "serve" in r.output

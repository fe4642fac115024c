"""`homeforge learn`, `monitor` and `ab report` as a user runs them: help with examples, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_help_has_examples():
    from typer.testing import CliRunner

    from homeforge.cli import app

    for cmd in (["learn"], ["monitor"], ["ab", "report"]):
        r = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0 and "Examples" in r.output, (cmd, r.output)


def test_bad_input_exits_2_without_traceback(tmp_path):
    (tmp_path / "model").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "HOMEFORGE_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "homeforge", "learn", "model", "--data", "a", "--docs", "b"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "exactly one source" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bad_input_in_process(tmp_path, monkeypatch):
    from homeforge.config import LearnConfig, load_config
    from homeforge.continual.ab import report
    from homeforge.continual.learn import learn, resolve_champion
    from homeforge.errors import ConfigError, HomeforgeError

    monkeypatch.setenv("HOMEFORGE_REGISTRY", str(tmp_path / "registry"))
    (tmp_path / "empty").mkdir()
    for ref, text in ((None, "no champion given"), (str(tmp_path / "missing"), "does not exist"),
                      ("nosuchname", "no model named")):
        with pytest.raises(HomeforgeError, match=text):
            resolve_champion(ref)
    with pytest.raises(ConfigError, match="replay.ratio"):
        load_config(LearnConfig, None, ["replay.ratio=1.5"])
    with pytest.raises(HomeforgeError, match="no feedback log"):
        report(tmp_path / "empty")
    with pytest.raises(HomeforgeError, match="--paired must be auto, yes or no"):
        report(tmp_path / "empty", paired="maybe")
    with pytest.raises(HomeforgeError, match="needs exactly one source"):
        learn(LearnConfig(model=str(tmp_path / "empty"), output_dir=str(tmp_path / "out")))

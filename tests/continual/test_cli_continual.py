"""`homeforge learn`, `monitor` and `ab report` as a user runs them: help with examples, clear errors."""

from __future__ import annotations

import subprocess
import sys


def hf(tmp, *args):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "HOMEFORGE_HOME": str(tmp / "home"),
           "HOMEFORGE_REGISTRY": str(tmp / "registry")}
    return subprocess.run([sys.executable, "-m", "homeforge", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=tmp, timeout=300)


def test_help_has_examples(tmp_path):
    for cmd in (["learn"], ["monitor"], ["ab", "report"]):
        r = hf(tmp_path, *cmd, "--help")
        assert r.returncode == 0 and "Examples" in r.stdout, (cmd, r.stderr)


def test_bad_input_is_a_clear_error(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "empty").mkdir()
    cases = [  # each a process start (a few seconds): the rest are checked in-process below
        (["learn", "model", "--data", "a", "--docs", "b"], "exactly one source"),
        (["learn", "model", "--data", "a", "replay.ratio=1.5"], "replay.ratio"),
        (["ab", "report", "empty", "--paired", "maybe"], "--paired must be auto, yes or no"),
    ]
    for args, text in cases:
        r = hf(tmp_path, *args)
        assert r.returncode == 2, (args, r.returncode, r.stdout, r.stderr)
        assert text in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_bad_input_in_process(tmp_path, monkeypatch):
    import pytest

    from homeforge.config import LearnConfig
    from homeforge.continual.ab import report
    from homeforge.continual.learn import learn, resolve_champion
    from homeforge.errors import HomeforgeError

    monkeypatch.setenv("HOMEFORGE_REGISTRY", str(tmp_path / "registry"))
    (tmp_path / "empty").mkdir()
    for ref, text in ((None, "no champion given"), (str(tmp_path / "missing"), "does not exist"),
                      ("nosuchname", "no model named")):
        with pytest.raises(HomeforgeError, match=text):
            resolve_champion(ref)
    with pytest.raises(HomeforgeError, match="no feedback log"):
        report(tmp_path / "empty")
    with pytest.raises(HomeforgeError, match="needs exactly one source"):
        learn(LearnConfig(model=str(tmp_path / "empty"), output_dir=str(tmp_path / "out")))

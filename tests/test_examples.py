"""Every example config users copy loads against the schema of the command it names."""

import re
from pathlib import Path

import pytest

import homeforge.pipeline.spec  # noqa: F401  (registers the `run` schema)
from homeforge.config import STAGES, load_config

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
COMMAND = re.compile(r"homeforge (\w+) [^\n]*--config examples/([\w.-]+\.yaml)")


def test_there_are_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_against_its_stage(path):
    commands = {cmd for cmd, name in COMMAND.findall(path.read_text()) if name == path.name}
    assert len(commands) == 1, f"{path.name} must say in a comment which command takes it (`homeforge CMD --config ...`)"
    stage = commands.pop()
    assert stage in STAGES, f"{path.name}: no stage schema for `homeforge {stage}`"
    load_config(STAGES[stage], path)  # raises ConfigError naming every bad key/value

import pytest

from homeforge.config import QuickstartConfig, TrainConfig, describe, load_config
from homeforge.errors import ConfigError


def test_defaults_and_overrides_refine_nested_defaults():
    cfg = load_config(QuickstartConfig, overrides=["train.max_steps=7", "train.optim.lr=3e-4", "prompts=[a, b]"])
    assert cfg.train.max_steps == 7
    assert cfg.train.optim.lr == pytest.approx(3e-4)
    assert cfg.prompts == ["a", "b"]
    # the quickstart's own defaults for other train fields survive a partial override
    assert cfg.train.micro_batch_size == QuickstartConfig().train.micro_batch_size == 16


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("seq_len: 64\noptim:\n  lr: 0.01\n")
    cfg = load_config(TrainConfig, f, ["optim.lr=0.02"])
    assert cfg.seq_len == 64 and cfg.optim.lr == 0.02 and cfg.optim.weight_decay == 0.1


def test_every_problem_listed_at_once(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("seq_len: -3\nmicro_batch_sise: 4\nprecision: fp8\noptim:\n  lr: fast\n")
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, f, ["schedule.kind=triangle", "nonsense"])
    problems = info.value.problems
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "seq_len" in text and "-3" in text and "greater than or equal to 8" in text
    assert "micro_batch_sise: unknown key" in text and "did you mean 'micro_batch_size'" in text
    assert "precision" in text and "'fp8'" in text and "'fp32'" in text
    assert "optim.lr" in text and "'fast'" in text
    assert "schedule.kind" in text and "'cosine'" in text
    assert "override 'nonsense'" in text
    assert str(f) in info.value.render()


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TrainConfig, f)


def test_describe_lists_nested_keys_with_descriptions():
    rows = {k: (d, desc) for k, d, desc in describe(QuickstartConfig)}
    assert rows["train.optim.lr"][0] == "0.002"
    assert "peak learning rate" in rows["train.optim.lr"][1]
    assert "tokenizer.vocab_size" in rows

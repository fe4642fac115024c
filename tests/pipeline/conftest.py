"""Models shared by the registry and serving tests."""

from __future__ import annotations

import pytest

from .test_run import hf


@pytest.fixture(scope="session")
def two_models(tiny_dataset, tmp_path_factory):
    """A barely trained and a better trained model of the same dataset, each evaluated on the same data."""
    tmp = tmp_path_factory.mktemp("reg")
    out = {}
    for name, steps in (("weak", 3), ("strong", 60)):
        hf(tmp, "train", "--data", tiny_dataset, "--output", tmp / name, "model.preset=debug", f"max_steps={steps}",
           "seq_len=64", "eval_every=30", "optim.lr=3e-3", "tracking.tensorboard=false", "threads=1")
        hf(tmp, "eval", tmp / name / "model", "--data", tiny_dataset, "robustness.enabled=false",
           "generation.enabled=false", "max_examples=40", "threads=1")
        out[name] = (tmp / name / "model", tmp / name / "model-eval")
    return tmp, out

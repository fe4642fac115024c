"""Continual learning schemas: `homeforge learn` (replay + EWC) and `homeforge monitor` thresholds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from homeforge.config.base import Section, encrypt_field
from homeforge.config.train import TrainConfig


class ReplayConfig(Section):
    """Experience replay: a share of every batch comes from a fixed sample of the old training data."""

    ratio: float = Field(0.3, ge=0, lt=1, description="share of training samples replayed from the old data (0 = off)")
    buffer: int = Field(2000, ge=0, description="old samples kept in the replay buffer (0 = all of the old train split)")


class EwcConfig(Section):
    """Elastic weight consolidation: a quadratic pull towards the champion, weighted by its Fisher information."""

    lam: float = Field(0.0, ge=0, description="penalty strength lambda (0 = off); scale with 1 / typical Fisher value")
    samples: int = Field(64, ge=1, description="old-data sequences the Fisher is estimated on")
    decay: float = Field(0.9, ge=0, le=1, description="online EWC: the candidate stores decay * F_old + F_new")
    reuse: bool = Field(True, description="use the Fisher stored with the champion (ewc/fisher.safetensors) when present")


def _learn_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=100, optim={"lr": 3e-4, "weight_decay": 0.0}, schedule={"warmup_steps": 5},
                       eval_every=50, log_every=5, checkpoint={"every": 0, "best": False},
                       tracking={"tensorboard": False})


class LearnConfig(Section):
    """`homeforge learn`: fine-tune the champion on new data with replay and EWC; register a candidate."""

    model: str | None = Field(None, description="the champion: a model directory or a registry reference NAME or NAME@ALIAS")
    mode: Literal["full", "lora"] = Field("full", description="full fine-tune, or LoRA adapters (train.lora.*)")
    data: str | None = Field(None, description="new data: a dataset directory made by `homeforge prepare`")
    docs: list[str] = Field(default_factory=list, description="new data: folders/files of documents, prepared with the champion's tokenizer")
    feedback: str | None = Field(None, description="new data: a feedback log written by `homeforge serve` (feedback.enabled)")
    min_rating: int | None = Field(None, description="feedback: keep only exchanges rated at least this (corrections always kept)")
    old_data: str | None = Field(None, description="the champion's training dataset (default: the one its manifest names)")
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    ewc: EwcConfig = Field(default_factory=EwcConfig)
    eval_batches: int = Field(50, ge=1, description="held-out micro-batches measured on the old and the new data (before and after)")
    train: TrainConfig = Field(default_factory=_learn_train_defaults)
    output_dir: str = Field("homeforge-runs/learn", description="run directory: data/, checkpoints, model/ (the candidate)")
    name: str | None = Field(None, description="registry name to register the candidate under (default: the champion's, when it came from the registry)")
    alias: str = Field("candidate", description="alias the registered candidate gets")
    encrypt: bool = encrypt_field("the new dataset and the candidate")


class MonitorThresholds(Section):
    """Alert thresholds of `homeforge monitor` (None = not checked)."""

    psi: float | None = Field(0.2, ge=0, description="token-distribution PSI above this is input drift (0.1 small, 0.25 large)")
    js: float | None = Field(0.1, ge=0, le=1, description="Jensen-Shannon divergence (base 2) above this is input drift")
    mmd: float | None = Field(None, ge=0, description="embedding MMD^2 above this is input drift (needs --embeddings)")
    ppl_ratio: float | None = Field(1.5, gt=0, description="traffic perplexity / training perplexity above this is output drift")
    class_psi: float | None = Field(0.2, ge=0, description="classifiers: PSI of the mean predicted class distribution vs the earlier traffic (needs --last)")
    refusal_rate: float | None = Field(0.2, ge=0, le=1, description="share of responses that refuse, above this")
    length_ratio: float | None = Field(2.0, gt=1, description="mean response length vs the first window, beyond this factor (either way)")
    p99_ms: float | None = Field(None, gt=0, description="P99 latency above this many milliseconds")


class FeedbackConfig(Section):
    """`serve` feedback capture (off by default): exchanges and ratings to an encrypted, PII-scrubbed, rotating log."""

    enabled: bool = Field(False, description="record every answered request and accept POST /v1/feedback")
    dir: str | None = Field(None, description="folder of the rotating log files (default: $HOMEFORGE_HOME/feedback)")
    encrypt: bool = Field(True, description="encrypt the log with the data key (`homeforge keys init`); false = plaintext at rest")
    scrub: bool = Field(True, description="replace personal data in prompts, responses and corrections before writing")
    max_mb: float = Field(16.0, gt=0, description="start a new file when the current one would pass this size")
    retention_days: float = Field(30.0, gt=0, description="delete files older than this")
    max_files: int = Field(50, ge=1, description="keep at most this many files (oldest deleted first)")
    remember: int = Field(100_000, ge=1, description="recent response ids feedback may refer to")


class AbConfig(Section):
    """`serve` live A/B test: a share of the traffic goes to a candidate model, every response names its arm."""

    candidate: str | None = Field(None, description="the candidate: a model directory or registry:NAME@ALIAS (None = no A/B)")
    percent: float = Field(50.0, ge=0, le=100, description="share of traffic (percent) the candidate answers")
    by: Literal["request", "key"] = Field("request", description="request = a fresh draw per request; key = sticky per "
                                          "API key or X-Homeforge-User header (hash), so one user sees one arm")
    seed: int = Field(0, description="seed of the split")

"""Typed configuration for every stage: pydantic v2 schemas, YAML files, dotted overrides.

A config is loaded with ``load_config(Schema, path, ["train.lr=3e-4", ...])``. Every
problem is collected and reported at once, each naming the field, the value given and
what is allowed. Stages register their schema in ``STAGES`` so that
``homeforge config show STAGE`` can print the defaults with their descriptions.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from homeforge.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------- model / train


class ModelSpec(Section):
    """Which model to start from: a built-in preset (from scratch) or a local HF directory."""

    preset: str | None = Field(
        "tiny", description="built-in architecture preset when training from scratch (see `homeforge.models.presets.PRESETS`)"
    )
    path: str | None = Field(None, description="local Hugging Face model directory to start from (overrides preset)")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="extra transformers config fields, e.g. {num_hidden_layers: 2}"
    )


class OptimConfig(Section):
    """AdamW with decoupled weight decay (no decay on biases, norms and embeddings)."""

    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay for 2-D weights")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, ge=0, description="clip gradients to this global norm (0 = off)")


class ScheduleConfig(Section):
    """Learning-rate schedule: linear warmup, then cosine/linear decay or constant."""

    kind: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay shape after warmup")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of the peak")


class CheckpointConfig(Section):
    """Checkpoints: every N steps and at the best validation loss; atomic; last K kept."""

    every: int = Field(100, ge=0, description="save a checkpoint every N optimizer steps (0 = only at the end)")
    keep: int = Field(3, ge=1, description="keep the last K step checkpoints (the best one is kept apart)")
    best: bool = Field(True, description="also keep the checkpoint with the best validation loss (checkpoints/best)")


class TrackingConfig(Section):
    """Where metrics go: metrics.jsonl always; TensorBoard and MLflow on request."""

    tensorboard: bool = Field(True, description="write TensorBoard event files to RUN/tensorboard")
    mlflow: bool = Field(False, description="log to a local MLflow store")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite:///RUN/mlflow.db; never a remote server)")
    experiment: str = Field("homeforge", description="MLflow experiment name")
    run_name: str | None = Field(None, description="run name (default: the output directory name)")


class DistributedConfig(Section):
    """Multi-process training under torchrun (`homeforge train --nproc N`)."""

    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp = replicate; fsdp = FSDP2 fully_shard per block")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto = nccl on GPUs, gloo on CPUs")


class TrainConfig(Section):
    """Training: method, model, data, batch, budget, optimizer, schedule, checkpoints."""

    method: Literal["pretrain", "sft", "lora", "classify"] = Field("pretrain", description="training method")
    model: ModelSpec = Field(default_factory=ModelSpec)
    seq_len: int = Field(256, ge=8, description="tokens per training sequence")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward/backward pass")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    max_steps: int = Field(1000, ge=1, description="optimizer steps (upper bound)")
    max_minutes: float | None = Field(None, gt=0, description="wall-clock budget; stops cleanly when reached")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = native mixed precision where the hardware has it (bf16/fp16 GPU), else fp32"
    )
    eval_every: int = Field(100, ge=1, description="evaluate validation loss every N steps")
    eval_batches: int = Field(20, ge=1, description="validation micro-batches per evaluation")
    log_every: int = Field(10, ge=1, description="log metrics every N steps")
    seed: int = Field(1234, description="seed for model init, data order and dropout")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    data: str | None = Field(None, description="dataset artifact directory (made by `homeforge prepare`)")
    output_dir: str = Field("homeforge-runs/train", description="run directory: checkpoints, metrics, plots, final model")
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward (less memory, ~30% slower)")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many evaluations without a validation-loss improvement (None = off)"
    )
    early_stopping_min_delta: float = Field(0.0, ge=0, description="smallest validation-loss drop that counts as improvement")
    peak_tflops: float | None = Field(
        None, gt=0, description="peak TFLOP/s per process for MFU (None = measured once with a matmul probe and cached)"
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)


# --------------------------------------------------------------------------- quickstart


class CorpusConfig(Section):
    """The built-in corpus: text already on this machine."""

    source: Literal["stdlib-docstrings"] = Field(
        "stdlib-docstrings", description="docstrings of the running interpreter's standard library (tests excluded)"
    )
    max_chars: int = Field(2_500_000, ge=10_000, description="stop collecting after this many characters")
    min_chars: int = Field(80, ge=1, description="skip docstrings shorter than this")
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="fraction of documents held out (by content hash)")


class TokenizerConfig(Section):
    """Byte-level BPE tokenizer trained with `tokenizers`."""

    vocab_size: int = Field(8192, ge=260, le=1_000_000, description="vocabulary size including special tokens")
    min_frequency: int = Field(2, ge=1, description="minimum pair frequency for a merge")


class QuickstartConfig(Section):
    """The main job on a built-in default: corpus -> tokenizer -> pretrain -> evaluate -> samples."""

    output_dir: str = Field("homeforge-runs/quickstart", description="where the run and its model directory go")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            model=ModelSpec(preset="tiny"),
            seq_len=256,
            micro_batch_size=16,
            max_steps=2000,
            max_minutes=6.0,
            optim=OptimConfig(lr=2e-3),
            schedule=ScheduleConfig(warmup_steps=30),
            eval_every=100,
        )
    )
    prompts: list[str] = Field(
        default_factory=lambda: ["Return the number of", "This module provides", "Raise ValueError if"],
        description="prompts for the sample generations printed at the end",
    )
    max_new_tokens: int = Field(40, ge=1, description="tokens generated per sample")


# --------------------------------------------------------------------------- registry + loading

STAGES: dict[str, type[Section]] = {
    "quickstart": QuickstartConfig,
    "train": TrainConfig,
}


def register_stage(name: str, schema: type[Section]) -> None:
    """Make a stage's schema known to `homeforge config show`."""
    STAGES[name] = schema


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> tuple[dict, list[str]]:
    """Turn ``["a.b=1", "c=[1,2]"]`` into a nested dict; values are parsed as YAML."""
    data: dict = {}
    problems: list[str] = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override {item!r}: expected KEY.SUB=VALUE, e.g. train.optim.lr=3e-4")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, key, value)
    return data, problems


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _allowed_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at the parent of ``loc`` (for unknown-key messages)."""
    model: Any = schema
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}).keys())


def format_validation_error(schema: type[BaseModel], err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        field = ".".join(loc) or "(root)"
        given = e.get("input")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema, loc)
            hint = difflib.get_close_matches(loc[-1], allowed, n=1)
            msg = f"{field}: unknown key (given {given!r})"
            if hint:
                msg += f"; did you mean {hint[0]!r}?"
            if allowed:
                msg += f" allowed here: {', '.join(allowed)}"
            problems.append(msg)
        else:
            problems.append(f"{field}: {e['msg']} (given {given!r})")
    return problems


def load_config(
    schema: type[Section],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
) -> Any:
    """Load ``schema``: its defaults, then ``base``, the YAML file at ``path``, then ``overrides``.

    Raises ConfigError listing every problem (file, key and value errors) at once.
    """
    try:  # defaults first, so every layer refines them
        data: dict = schema().model_dump(mode="json")
    except ValidationError:  # a schema with required fields has no complete default
        data = {}
    if base:
        data = deep_merge(data, base)
    where = None
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {p} does not exist"], where=where)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"YAML syntax error: {exc}"], where=where) from None
        if not isinstance(loaded, dict):
            raise ConfigError([f"top level must be a mapping of keys, got {type(loaded).__name__}"], where=where)
        data = deep_merge(data, loaded)
    extra, problems = parse_overrides(overrides)
    data = deep_merge(data, extra)
    try:
        cfg = schema.model_validate(data)
    except ValidationError as exc:
        problems += format_validation_error(schema, exc)
        cfg = None
    if problems:
        raise ConfigError(problems, where=where)
    return cfg


def describe(schema: type[BaseModel]) -> list[tuple[str, str, str]]:
    """Flatten a schema into (dotted key, default, description) rows, defaults included."""
    return _describe_instance(schema(), "")


def _describe_instance(instance: BaseModel, prefix: str) -> list[tuple[str, str, str]]:
    rows = []
    for name, field in type(instance).model_fields.items():
        key = f"{prefix}{name}"
        value = getattr(instance, name)
        if isinstance(value, BaseModel):
            rows.append((key, "", field.description or (type(value).__doc__ or "").strip().splitlines()[0]))
            rows += _describe_instance(value, key + ".")
        else:
            rows.append((key, repr(value), field.description or ""))
    return rows


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

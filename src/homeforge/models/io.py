"""Hugging Face model directories: load (local only, with clear errors) and save.

A homeforge model directory is a plain HF directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json) plus ``homeforge.json``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from homeforge.errors import HomeforgeError


def check_model_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise HomeforgeError(
            f"model directory {p} does not exist",
            fix="pass a local model directory (homeforge never downloads models); e.g. the output of `homeforge quickstart`",
        )
    no_config = not (p / "config.json").is_file()
    if no_config and ((p / "adapter_config.json").is_file() or (p / "adapter" / "adapter_config.json").is_file()):
        raise HomeforgeError(f"{p} holds a LoRA adapter, not a full model", where=str(p),
                             fix=f"merge it into its base first: homeforge export {p} --format hf --base BASE_MODEL_DIR "
                                 "(or train with lora.merge=true)")
    if no_config and p.is_dir() and (ggufs := sorted(p.glob("*.gguf"))):
        raise HomeforgeError(f"{p} holds a GGUF file, not a Hugging Face model directory", where=str(p),
                             fix=f"import it first: homeforge import {ggufs[0]} -o MODEL_DIR")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise HomeforgeError(
            f"{p} is not a model directory: it has no config.json",
            where=str(p),
            fix="pass a Hugging Face model directory (config.json + weights + tokenizer)",
        )
    weights = list(p.glob("*.safetensors")) + list(p.glob("*.bin")) + list(p.glob("*.safetensors.index.json"))
    if not weights and any(p.glob("*.onnx")):
        raise HomeforgeError(f"{p} is an ONNX export: it has a graph but no PyTorch weights", where=str(p),
                             fix=f"serve it with `homeforge serve {p}` (ONNX Runtime); other commands need the "
                                 "model directory it was exported from")
    if not weights:
        raise HomeforgeError(f"{p} has a config.json but no weights (*.safetensors)", where=str(p),
                             fix="copy the weight files into the directory, or re-run the stage that made it")
    return p


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    p = Path(path)
    if not ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()):
        raise HomeforgeError(f"{p} has no tokenizer (tokenizer.json)", where=str(p),
                             fix="copy the tokenizer files into the model directory")
    from homeforge.security.storage import decrypted_tokenizer_dir

    with decrypted_tokenizer_dir(p) as d:  # an encrypted vocabulary is decrypted to memory-backed storage only
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def load_causal_lm(path: str | Path, dtype=None, with_tokenizer: bool = True, dequantize: bool = False):
    """Load a local causal LM (and its tokenizer). Never reaches a hub.

    A `homeforge compress` int8/int4 directory is rebuilt with this hardware's kernels, or
    with ``dequantize`` as a plain fp32 model of the dequantized weights (for exporters).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    p = check_model_dir(path)
    if (arch := classifier_architecture(p)) is not None:
        raise HomeforgeError(f"{p} holds a sequence classifier ({arch}), not a causal language model", where=str(p),
                             fix="this command needs a causal LM; classifiers are evaluated with `homeforge eval`, "
                                 "compressed with `homeforge compress` and served with `homeforge serve`")
    from homeforge.compress.quantize import load_quantized, read_quantization

    try:
        qinfo = read_quantization(p)  # a `homeforge compress` int8/int4 directory: rebuilt for this hardware
        from homeforge.security import storage

        if qinfo:
            model = load_quantized(p, qinfo, dequantize=dequantize)
        elif storage.has_encrypted_weights(p):  # decrypted in memory only (security/storage.py)
            model = storage.load_encrypted_pretrained(AutoModelForCausalLM, p, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise HomeforgeError(f"could not load the model in {p}: {exc}", where=str(p),
                             fix="check that the directory is a complete Hugging Face causal LM") from None
    model.eval()
    tok = load_tokenizer(p) if with_tokenizer else None
    return model, tok


@contextmanager
def quiet_transformers():
    """transformers' log level at "error" inside the block (expected warnings), then back to what it was."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def classifier_architecture(p: Path) -> str | None:
    """The ``*ForSequenceClassification`` architecture named in ``p/config.json``, or None."""
    import json

    try:
        archs = json.loads((p / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return None
    return next((a for a in archs if a.endswith("ForSequenceClassification")), None)


def load_classifier(path: str | Path, with_tokenizer: bool = True):
    """Load a local sequence classifier: plain, encrypted or a `homeforge compress` int8/int4 directory."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from homeforge.compress.quantize import load_quantized, read_quantization
    from homeforge.security import storage

    p = check_model_dir(path)
    if qinfo := read_quantization(p):  # checked first: a quantized directory may also be encrypted
        model = load_quantized(p, qinfo)
    elif storage.has_encrypted_weights(p):  # decrypted in memory only (security/storage.py)
        model = storage.load_encrypted_pretrained(AutoModelForSequenceClassification, p, torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(p), local_files_only=True, dtype=torch.float32)
    return model.eval(), (load_tokenizer(p) if with_tokenizer else None)


def save_model_dir(model, tokenizer, out: str | Path, generation: dict | None = None) -> None:
    """Save model weights (safetensors), tokenizer and generation config into ``out``."""
    from transformers import GenerationConfig

    out = Path(out)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **(generation or {}),
    )
    gen.save_pretrained(str(out))

"""Hugging Face model directories: load (local only, with clear errors) and save.

A homeforge model directory is a plain HF directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json) plus ``homeforge.json``.
"""

from __future__ import annotations

from pathlib import Path

from homeforge.errors import HomeforgeError


def check_model_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise HomeforgeError(
            f"model directory {p} does not exist",
            fix="pass a local model directory (homeforge never downloads models); e.g. the output of `homeforge quickstart`",
        )
    if not p.is_dir() or not (p / "config.json").is_file():
        raise HomeforgeError(
            f"{p} is not a model directory: it has no config.json",
            where=str(p),
            fix="pass a Hugging Face model directory (config.json + weights + tokenizer)",
        )
    weights = list(p.glob("*.safetensors")) + list(p.glob("*.bin")) + list(p.glob("*.safetensors.index.json"))
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

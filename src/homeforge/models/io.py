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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx", ".onnx.data", ".gguf")


def _tokenizer_files(manifest_files: dict, root: Path, p: Path) -> list[str]:
    """The files of ``p`` (inside the artifact ``root``) a tokenizer load reads: everything but weights."""
    sub = "" if p == root else p.relative_to(root).as_posix() + "/"
    return [r for r in manifest_files if r.startswith(sub) and "/" not in r[len(sub):]
            and not r.endswith(WEIGHT_SUFFIXES)]


def load_tokenizer(path: str | Path, verify: bool = True):
    """The tokenizer in ``path`` (a model directory or a dataset's ``tokenizer/``), checked against the
    artifact's manifest first (``integrity``); encrypted vocabularies are decrypted in memory."""
    from transformers import AutoTokenizer

    from homeforge import integrity

    p = Path(path).absolute()
    if not ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()):
        raise HomeforgeError(f"{p} has no tokenizer (tokenizer.json)", where=str(p),
                             fix="copy the tokenizer files into the model directory")
    from homeforge.security.storage import decrypted_tokenizer_dir

    rels = None
    root = integrity.artifact_root(p) if verify and integrity.verify_enabled() else None
    if root is not None:
        rels = _tokenizer_files(integrity.read_manifest_file(root)["files"], root, p)
    with integrity.verified_load(p, rels) if verify else _nothing():
        try:
            with decrypted_tokenizer_dir(p) as d:  # an encrypted vocabulary is decrypted to memory-backed storage only
                return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except HomeforgeError:
            raise
        except Exception as exc:  # a damaged or incomplete tokenizer: say which, never a traceback
            raise HomeforgeError(f"could not load the tokenizer in {p}: {type(exc).__name__}: {exc}", where=str(p),
                                 fix="restore the tokenizer files (tokenizer.json, tokenizer_config.json) or re-run "
                                     "the stage that made the directory") from None


@contextmanager
def _nothing():
    yield None


HEADS = {"causal": "AutoModelForCausalLM", "classifier": "AutoModelForSequenceClassification"}


def load_model(path: str | Path, *, head: str = "causal", dtype=None, with_tokenizer: bool = True,
               dequantize: bool = False, config_updates: dict | None = None, new_head: bool = False,
               verify: bool = True):
    """The one model loader: (model, tokenizer or None) from a local directory. Never reaches a hub.

    Plain, encrypted (decrypted in memory only) and `homeforge compress` int8/int4 directories
    (rebuilt for this hardware, or with ``dequantize`` as plain fp32). Every file is checked
    against the artifact's manifest before the model is returned (``integrity.verified_load``):
    a flipped byte, a truncated or missing file, an edited config.json or manifest is refused
    with the file named. ``head``: ``causal`` or ``classifier``; ``config_updates`` with
    ``new_head`` builds a classifier with a fresh head on a causal LM or encoder checkpoint.
    ``verify=False`` only for a stage re-reading what it is writing in its own temp folder.
    """
    from homeforge import integrity

    p = check_model_dir(path).absolute()
    with integrity.verified_load(p) if verify else _nothing():
        arch = classifier_architecture(p)
        if head == "causal" and arch is not None:
            raise HomeforgeError(f"{p} holds a sequence classifier ({arch}), not a causal language model", where=str(p),
                                 fix="this command needs a causal LM; classifiers are evaluated with `homeforge eval`, "
                                     "compressed with `homeforge compress` and served with `homeforge serve`")
        try:
            model = _load_weights(p, head, dtype, dequantize, config_updates, new_head)
        except HomeforgeError:
            raise
        except Exception as exc:  # truncated safetensors, a config that does not fit its weights...
            raise HomeforgeError(f"could not load the model in {p}: {type(exc).__name__}: {exc}", where=str(p),
                                 fix="check that the directory is a complete Hugging Face model (config.json, "
                                     "weights, tokenizer), or re-run the stage that made it") from None
        model.eval()
        tok = load_tokenizer(p, verify=False) if with_tokenizer else None  # verified with the rest
    return model, tok


def _load_weights(p: Path, head: str, dtype, dequantize: bool, config_updates: dict | None, new_head: bool):
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from homeforge.models.quantized import load_quantized, read_quantization
    from homeforge.security import storage

    hf_logging.disable_progress_bar()
    auto_cls = getattr(transformers, HEADS[head])
    dtype = dtype or torch.float32
    if qinfo := read_quantization(p):  # checked first: a quantized directory may also be encrypted
        if new_head:
            raise HomeforgeError(f"{p} is a quantized model ({qinfo.get('method')}); it cannot be trained further",
                                 where=str(p), fix="train from the full-precision model it was compressed from, or "
                                 f"write dequantized fp32 weights first: homeforge export {p} --format hf")
        return load_quantized(p, qinfo, dequantize=dequantize)
    if storage.has_encrypted_weights(p):  # decrypted in memory only (security/storage.py)
        return _from_state(auto_cls, p, dtype, config_updates or {}, new_head)
    kwargs = dict(config_updates or {})
    if new_head:
        kwargs["ignore_mismatched_sizes"] = True
    with quiet_transformers() if new_head else _nothing():  # "newly initialized: score.weight" is expected
        return auto_cls.from_pretrained(str(p), local_files_only=True, dtype=dtype, **kwargs)


def _from_state(auto_cls, p: Path, dtype, config_updates: dict, new_head: bool):
    """Build ``auto_cls`` from config.json and load weights decrypted in memory (nothing written to disk)."""
    from transformers import AutoConfig

    from homeforge.security import storage

    config = AutoConfig.from_pretrained(str(p), local_files_only=True, **config_updates)
    model = auto_cls.from_config(config, dtype=dtype)
    state: dict = {}
    for f in storage.weight_files(p):
        state.update(storage.load_safetensors(f))
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = {n for n, _ in model.named_parameters()}  # after tying, shared weights appear once
    missing = [k for k in result.missing_keys if k in tied and not _is_tied(model, k)]
    if new_head:  # a fresh classification head (and pooler) is expected to be missing
        missing = [k for k in missing if k.split(".")[0] not in ("score", "classifier") and ".pooler." not in k]
        unexpected = []
    else:
        unexpected = result.unexpected_keys
    if missing or unexpected:
        raise HomeforgeError(f"the encrypted weights in {p} do not match its config.json "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})", where=str(p),
                             fix="re-run the stage that made the model")
    return model.to(dtype)


def _is_tied(model, name: str) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return (out is not None and inp is not None and out.weight is inp.weight
            and name.endswith("weight") and "lm_head" in name)


def load_causal_lm(path: str | Path, dtype=None, with_tokenizer: bool = True, dequantize: bool = False):
    """``load_model(head="causal")``: a local causal LM (and its tokenizer), verified before use."""
    return load_model(path, head="causal", dtype=dtype, with_tokenizer=with_tokenizer, dequantize=dequantize)


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
    """``load_model(head="classifier")``: plain, encrypted or a `homeforge compress` int8/int4 classifier."""
    return load_model(path, head="classifier", with_tokenizer=with_tokenizer)


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

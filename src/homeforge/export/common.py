"""What every exporter shares: loading the source (LoRA merged), parity inputs and checks.

Parity is measured on next-token logits of fixed texts (``ParityConfig.texts``): the
exported model's logits against the PyTorch original's, as ``max |diff| / max |logit|``
(scale-free, so one tolerance fits models of any size) plus the fraction of positions
whose argmax token agrees. Every export writes the result into its manifest; an export
whose result exceeds the tolerance raises ``ParityError`` and nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from homeforge.errors import HomeforgeError

# default max_rel_error per precision of the exported weights
TOLERANCES = {"float32": 1e-4, "f32": 1e-4, "float16": 1e-2, "f16": 1e-2, "bfloat16": 5e-2,
              "q8_0": 0.1, "int8": 0.25}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")


class ParityError(HomeforgeError):
    """The exported model does not reproduce the original's logits within tolerance."""


@dataclass
class Source:
    """A model ready to export: the merged model, the reference to compare with, its tokenizer."""

    model: Any  # a plain transformers PreTrainedModel (LoRA merged), fp32, eval mode
    reference: Any  # what the parity check compares with (the unmerged PEFT model for adapters)
    tokenizer: Any
    path: Path
    lora: dict | None = None  # {"base": ..., "rank": ...} when a LoRA adapter was merged
    inputs: dict[str, Path] = field(default_factory=dict)  # for the manifest's input hashes


def tokenizer_dir(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def resolve(model_dir: str | Path, base_model: str | Path | None = None) -> tuple[Path, Path | None, dict | None]:
    """Check a model (or LoRA adapter) directory without loading it: (path, base dir, adapter config).

    Raises HomeforgeError when the directory, its weights, its tokenizer or an adapter's
    base is missing, before any heavy work.
    """
    from homeforge.models.io import check_model_dir

    p = Path(model_dir).expanduser()
    if not p.exists():
        raise HomeforgeError(f"model directory {p} does not exist", fix="pass a local model directory")
    if not (p / "config.json").is_file() and (p / "adapter" / "adapter_config.json").is_file():
        p = p / "adapter"  # a `homeforge train` LoRA run without a merged copy
    if not (p / "adapter_config.json").is_file():
        check_model_dir(p)
        if not tokenizer_dir(p):
            raise HomeforgeError(
                f"{p} has no tokenizer (tokenizer.json / tokenizer_config.json)",
                where=str(p),
                fix="copy the tokenizer files of the model into the directory; an export without its tokenizer cannot be used",
            )
        return p, None, None
    try:
        adapter_cfg = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise HomeforgeError(f"{p}/adapter_config.json is unreadable ({exc})", where=str(p)) from None
    base = Path(base_model).expanduser() if base_model else None
    if base is None:
        named = adapter_cfg.get("base_model_name_or_path")
        candidates = [Path(named), p / named, p.parent / named] if named else []
        base = next((c for c in candidates if (c / "config.json").is_file()), None)
        if base is None:
            raise HomeforgeError(
                f"{p} is a LoRA adapter but its base model {named!r} is not a local directory",
                where=str(p / "adapter_config.json"),
                fix="pass the base model directory with base_model=PATH (or --base PATH)",
            )
    check_model_dir(base)
    if not (tokenizer_dir(p) or tokenizer_dir(base)):
        raise HomeforgeError(f"neither the adapter {p} nor its base {base} has a tokenizer", where=str(p),
                             fix="copy the tokenizer files into the adapter or base directory")
    return p, base, adapter_cfg


def source_inputs(p: Path, base: Path | None) -> dict[str, Path]:
    return {"model": p, **({"base_model": base} if base is not None else {})}


def load_source(model_dir: str | Path, base_model: str | Path | None = None) -> Source:
    """Load a model directory for export; a PEFT LoRA adapter directory is merged into its base."""
    import torch

    from homeforge.models.io import load_causal_lm, load_tokenizer

    p, base, adapter_cfg = resolve(model_dir, base_model)
    if adapter_cfg is not None:
        return _load_lora(p, base, adapter_cfg)
    model, _ = load_causal_lm(p, dtype=torch.float32, with_tokenizer=False, dequantize=True)
    model.requires_grad_(False)
    tok = load_tokenizer(p)
    return Source(model=model, reference=model, tokenizer=tok, path=p, inputs=source_inputs(p, None))


def _load_lora(p: Path, base: Path, adapter_cfg: dict) -> Source:
    import torch

    from homeforge.models.io import load_causal_lm, load_tokenizer

    tok_dir = p if tokenizer_dir(p) else base
    try:
        import peft  # noqa: F401
    except ImportError:
        raise HomeforgeError("merging a LoRA adapter needs peft", fix="pip install 'homeforge[train]'") from None
    from homeforge.models.lora import (
        load_adapter,  # the one adapter loader: verified, plain or encrypted
    )

    base_model_obj, _ = load_causal_lm(base, dtype=torch.float32, with_tokenizer=False, dequantize=True)
    peft_model = load_adapter(base_model_obj, p).eval()
    tok = load_tokenizer(tok_dir)
    # the reference keeps the adapter unmerged; the exported model is a merged copy
    import copy

    reference = peft_model
    peft_model.requires_grad_(False)
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    lora = {"adapter": str(p), "base": str(base), "r": adapter_cfg.get("r"), "alpha": adapter_cfg.get("lora_alpha"),
            "target_modules": adapter_cfg.get("target_modules")}
    return Source(model=merged, reference=reference, tokenizer=tok, path=p, lora=lora,
                  inputs=source_inputs(p, base))


# --------------------------------------------------------------------------- parity


def parity_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of the parity texts (no special tokens added: what the tokenizer alone gives)."""
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if ids:
            out.append(list(ids))
    if not out:
        raise HomeforgeError("the parity texts tokenize to nothing", fix="set parity.texts to some real text")
    return out


def torch_logits(model, ids_list: list[list[int]]) -> list[np.ndarray]:
    """fp32 logits [T, V] of each sequence, run one at a time (no padding involved)."""
    import torch

    out = []
    with torch.no_grad():
        for ids in ids_list:
            x = torch.tensor([ids], dtype=torch.long)
            out.append(model(input_ids=x).logits[0].float().numpy())
    return out


def compare(ref: list[np.ndarray], got: list[np.ndarray], tolerance: float, min_top1: float = 0.0) -> dict:
    """Parity figures of ``got`` against ``ref`` and whether they pass."""
    diff = max(float(np.abs(r - g).max()) for r, g in zip(ref, got, strict=True))
    scale = max(float(np.abs(r).max()) for r in ref) or 1.0
    agree = np.concatenate([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got, strict=True)])
    rel = diff / scale
    top1 = float(agree.mean())
    passed = rel <= tolerance and top1 >= min_top1
    return {"max_abs_diff": diff, "max_rel_error": rel, "tolerance": tolerance, "top1_agreement": top1,
            "min_top1_agreement": min_top1, "positions": int(agree.size), "passed": bool(passed)}


def check(result: dict, what: str, where: Path | str) -> None:
    """Raise ParityError (nothing is written) if ``result`` did not pass."""
    if result["passed"]:
        return
    raise ParityError(
        f"parity check failed for {what}: max relative logit error {result['max_rel_error']:.3g} "
        f"(tolerance {result['tolerance']:.3g}), top-1 agreement {result['top1_agreement']:.3f} "
        f"(required {result['min_top1_agreement']:.3f}); the export was not written",
        where=str(where),
        fix="if the difference is expected for this precision, loosen parity.max_rel_error; "
        "otherwise report the model and settings",
    )


def parity_line(name: str, res: dict) -> str:
    """One console line for a parity result (tolerances printed as given: 0.25, not 2e-01)."""
    return (f"{name}: max rel. logit error {res['max_rel_error']:.2e} (tolerance {res['tolerance']:.3g}), "
            f"top-1 agreement {res['top1_agreement']:.3f}")


def tolerance_for(precision: str, configured: float | None) -> float:
    return configured if configured is not None else TOLERANCES[precision]


def chat_template(tokenizer) -> str | None:
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, dict):  # several named templates: the default one
        tmpl = tmpl.get("default") or next(iter(tmpl.values()), None)
    return tmpl

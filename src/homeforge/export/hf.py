"""`--format hf`: a plain transformers directory (safetensors), LoRA merged, tokenizer and chat template.

The written directory is reloaded with ``AutoModelForCausalLM.from_pretrained`` and its
logits are compared with the original's before the artifact is committed.
"""

from __future__ import annotations

from pathlib import Path

from homeforge.config import ExportConfig
from homeforge.export import common


def export_hf(src: common.Source, out: Path, cfg: ExportConfig) -> dict:
    """Write ``src`` into ``out`` (a temp dir being built) and return the parity result."""
    import torch

    from homeforge.models.io import load_causal_lm, save_model_dir

    dtype = getattr(torch, cfg.hf.dtype)
    model = src.model.to(dtype) if dtype != torch.float32 else src.model
    gen = None
    if getattr(src.model, "generation_config", None) is not None:
        gen = {k: v for k, v in src.model.generation_config.to_diff_dict().items()
               if k not in ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version")}
    try:
        save_model_dir(model, src.tokenizer, out, generation=gen)
    finally:
        if dtype != torch.float32:
            src.model.to(torch.float32)
    ids = common.parity_ids(src.tokenizer, cfg.parity.texts)
    ref = common.torch_logits(src.reference, ids)
    reloaded, tok = load_causal_lm(out, dtype=torch.float32)
    got = common.torch_logits(reloaded, ids)
    tol = common.tolerance_for(cfg.hf.dtype, cfg.parity.max_rel_error)
    result = common.compare(ref, got, tol, cfg.parity.min_top1_agreement)
    result["tokenizer_equal"] = all(tok(t, add_special_tokens=False)["input_ids"] == list(i)
                                    for t, i in zip(cfg.parity.texts, ids, strict=False))
    result["chat_template"] = common.chat_template(tok) is not None
    if not result["tokenizer_equal"]:
        result["passed"] = False
    common.check(result, f"the HF export ({cfg.hf.dtype})", out)
    return {"parity": result, "files": {"weights": sorted(p.name for p in out.glob("*.safetensors"))}}

"""PEFT LoRA on local causal LMs: default targets per architecture, checked targets, merge.

Defaults (``default_targets``):

- dense decoders (Llama, Qwen2, Mistral, ...): every attention and MLP projection
  (``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``);
- DeepSeek-V3 (multi-head latent attention): ``q_proj`` (or ``q_a_proj``/``q_b_proj``),
  ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``;
- MoE models: the attention projections above plus the routed experts, which in
  transformers 5 are fused 3-D parameters (``mlp.experts.gate_up_proj``,
  ``mlp.experts.down_proj``) reached with peft's ``target_parameters``.

On MoE architectures peft maps the v4 names ``gate_proj``/``up_proj``/``down_proj`` to the
fused experts (so that adapters trained with transformers 4 still load). Those names
therefore cannot target the dense or shared-expert MLPs of an MoE model without breaking
adapter loading; they are left out of the MoE defaults, and a user who lists them gets the
routed experts, as peft defines.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from homeforge.errors import HomeforgeError

DENSE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                     "kv_b_proj", "qkv_proj", "query_key_value", "dense"]
EXPERT_PARAMS = ("gate_up_proj", "down_proj", "up_proj", "gate_proj")
NEVER_TARGET = {"lm_head", "score", "classifier", "gate", "router", "shared_expert_gate"}


def expert_parameters(model) -> list[str]:
    """Suffixes (``mlp.experts.gate_up_proj``) of the fused 3-D routed-expert parameters."""
    out = set()
    for name, p in model.named_parameters():
        parts = name.split(".")
        if p.ndim == 3 and len(parts) >= 3 and parts[-2] == "experts" and parts[-1] in EXPERT_PARAMS:
            out.add(".".join(parts[-3:]))
    return sorted(out)


def linear_modules(model) -> list[str]:
    """Leaf names of the ``nn.Linear`` layers inside the model body (LoRA candidates)."""
    names = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not out_emb:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in NEVER_TARGET:
                names.add(leaf)
    return sorted(names)


def default_targets(model) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) that suit the model's architecture."""
    present = set(linear_modules(model))
    experts = expert_parameters(model)
    if experts:
        modules = [m for m in ATTENTION_TARGETS if m in present]
    else:
        modules = [m for m in DENSE_TARGETS if m in present] or [m for m in ATTENTION_TARGETS if m in present]
    if not modules and not experts:
        raise HomeforgeError(
            f"found no layers to put LoRA on in this {type(model).__name__}",
            fix=f"set lora.target_modules to some of: {', '.join(sorted(present)) or '(no nn.Linear layers)'}",
        )
    return modules, experts


def check_targets(model, modules: list[str], parameters: list[str]) -> None:
    """Raise a HomeforgeError naming every target that does not exist, and the ones that do."""
    present = linear_modules(model)
    experts = expert_parameters(model)
    moe_aliases = {"gate_proj", "up_proj", "down_proj"} if experts else set()
    bad_m = [m for m in modules if m not in present and m not in moe_aliases]
    full = [n for n, p in model.named_parameters() if p.ndim == 3]
    bad_p = [t for t in parameters if not any(n == t or n.endswith("." + t) for n in full)]
    problems = []
    if bad_m:
        problems.append(f"lora.target_modules {bad_m} do not exist in this {type(model).__name__}; "
                        f"its linear layers are: {', '.join(present)}")
    if bad_p:
        problems.append(f"lora.target_parameters {bad_p} do not exist; "
                        f"its fused expert parameters are: {', '.join(experts) or '(none: not an MoE model)'}")
    if problems:
        raise HomeforgeError("; ".join(problems), fix="choose target names from the lists above (or leave them "
                             "empty for the architecture's defaults)")


def apply_lora(model, r: int = 16, alpha: float = 32, dropout: float = 0.05, target_modules: list[str] | None = None,
               target_parameters: list[str] | None = None, seed: int | None = None):
    """Wrap ``model`` in a PEFT LoRA model; only the adapter parameters are trainable.

    ``None`` targets mean the architecture's defaults; explicit lists are checked first.
    """
    from peft import LoraConfig, get_peft_model

    d_mod, d_par = default_targets(model)
    modules = d_mod if target_modules is None else list(target_modules)
    if modules == ["all-linear"]:  # every linear layer of the body (not the LM head / routers)
        modules = linear_modules(model)
    params = d_par if target_parameters is None else list(target_parameters)
    check_targets(model, modules, params)
    if not modules and not params:
        raise HomeforgeError("LoRA has no targets", fix="set lora.target_modules or lora.target_parameters")
    if params and dropout > 0:
        raise HomeforgeError(f"LoRA dropout ({dropout}) cannot be applied to fused MoE expert parameters "
                             f"({', '.join(params)}): peft's ParamWrapper has no dropout",
                             fix="set lora.dropout=0, or lora.target_parameters=[] to leave the experts alone")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules,
                     target_parameters=params or None, bias="none", task_type="CAUSAL_LM")
    from homeforge.runtime import seeded

    with seeded(seed), warnings.catch_warnings():  # peft's v4->v5 MoE rename notes; harmless here
        warnings.filterwarnings("ignore", message=".*(rank_pattern|alpha_pattern).*")
        warnings.filterwarnings("ignore", message=".*target_parameters.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, cfg)


def merged_copy(peft_model):
    """The base model with the adapter folded into its weights (the PEFT model is left intact)."""
    import copy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(rank_pattern|alpha_pattern).*")
        return copy.deepcopy(peft_model).merge_and_unload()


def save_adapter(peft_model, out: str | Path) -> None:
    peft_model.save_pretrained(str(out), safe_serialization=True)


def load_adapter(base_model, adapter_dir: str | Path, trainable: bool = False):
    """Attach a saved adapter to ``base_model``, its files checked against the artifact's manifest first
    (``integrity``); encrypted adapter weights are decrypted in memory. A clear error if it is not one."""
    from peft import PeftModel

    from homeforge import integrity
    from homeforge.security import storage

    p = Path(adapter_dir)
    if not (p / "adapter_config.json").is_file():
        raise HomeforgeError(f"{p} is not a LoRA adapter directory (no adapter_config.json)", where=str(p),
                             fix="pass the `adapter` directory written by a `method: lora` training run")
    with integrity.verified_load(p), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(rank_pattern|alpha_pattern).*")
        try:
            if storage.has_encrypted_weights(p):  # an encrypted adapter: decrypted in memory only
                return _load_encrypted_adapter(base_model, p, trainable)
            return PeftModel.from_pretrained(base_model, str(p), is_trainable=trainable)
        except HomeforgeError:
            raise
        except Exception as exc:
            raise HomeforgeError(f"could not load the LoRA adapter in {p}: {type(exc).__name__}: {exc}", where=str(p),
                                 fix="re-run the training that made it, or pass the base model it was trained on") from None


def _load_encrypted_adapter(base_model, p: Path, trainable: bool):
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict

    from homeforge.security import storage

    config = PeftConfig.from_pretrained(str(p))
    config.inference_mode = not trainable
    model = PeftModel(base_model, config)
    state: dict = {}
    for f in storage.weight_files(p):
        state.update(storage.load_safetensors(f))
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise HomeforgeError(f"the encrypted adapter in {p} does not match its adapter_config.json "
                             f"(unexpected {result.unexpected_keys[:3]})", where=str(p),
                             fix="re-run the training that made it")
    if not trainable:
        model.eval()
    return model

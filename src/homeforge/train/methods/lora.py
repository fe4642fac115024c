"""method: lora — PEFT LoRA adapters on a local causal LM; the base stays frozen.

Data: chat (SFT with assistant-only loss and packing, as in ``sft``) or text (continued
pretraining on packed windows). Targets default per architecture (``models.lora``); routed
MoE experts (fused 3-D parameters in transformers 5) are reached with peft's
``target_parameters``. Only adapter parameters are trainable, so checkpoints hold the
adapter and its optimizer state; on resume the base is reloaded from ``model.path`` and the
adapter initialised from the same seed before the checkpoint is restored.

Output: ``OUT/adapter`` (adapter_config.json + adapter_model.safetensors, loadable with
``peft.PeftModel.from_pretrained``) and, with ``lora.merge`` (default), the merged full
model in ``OUT`` itself, a plain HF directory that needs no peft.
"""

from __future__ import annotations

from pathlib import Path

from homeforge.errors import HomeforgeError
from homeforge.train.methods.common import (
    RouterMonitor,
    build_causal_lm,
    causal_lm_loss,
    moe_flops_per_token,
    open_dataset,
    unwrap,
    with_router_metrics,
)


def make_saver(cfg):
    def save_final(model, out_dir: Path, tokenizer) -> None:
        from homeforge.models.io import save_model_dir
        from homeforge.models.lora import merged_copy, save_adapter

        model = unwrap(model)
        out_dir = Path(out_dir)
        save_adapter(model, out_dir / "adapter")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir / "adapter"))
        if cfg.lora.merge:
            merged = merged_copy(model)
            if getattr(merged.config, "output_router_logits", False):
                merged.config.output_router_logits = False
            save_model_dir(merged, tokenizer, out_dir)

    return save_final


def build_task(cfg, data_dir):

    from homeforge.models.lora import apply_lora, expert_parameters
    from homeforge.train.methods.pretrain import text_sources
    from homeforge.train.methods.sft import chat_sources
    from homeforge.train.task import TrainTask

    if not cfg.model.path:
        raise HomeforgeError("method lora needs a pretrained model to adapt and model.path is not set",
                             fix="set model.path to a local Hugging Face model directory (or use method "
                                 "pretrain/sft to train a preset)")
    ds = open_dataset(data_dir, "lora")
    base, model_dir = build_causal_lm(cfg, ds)
    n_emb = base.get_input_embeddings().num_embeddings
    if ds.kind == "chat":
        train, val = chat_sources(cfg, ds, n_emb)
    else:
        train, val = text_sources(cfg, ds)
    for p in base.parameters():
        p.requires_grad_(False)
    lc = cfg.lora
    dropout = lc.dropout
    if dropout is None:  # peft cannot drop out on fused expert parameters: no dropout when they are targeted
        experts = lc.target_parameters if lc.target_parameters is not None else expert_parameters(base)
        dropout = 0.0 if experts else 0.05
    model = apply_lora(base, r=lc.r, alpha=lc.alpha, dropout=dropout, target_modules=lc.target_modules,
                       target_parameters=lc.target_parameters, seed=cfg.seed)
    model.train()
    monitor = RouterMonitor(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return TrainTask(
        model=model, train=train, val=val,
        loss_fn=with_router_metrics(causal_lm_loss, monitor),
        save_final=make_saver(cfg), tokenizer=ds.tokenizer,
        flops_per_token=moe_flops_per_token(model, cfg.seq_len),
        info={"method": "lora", "architecture": type(base).__name__, "base": str(model_dir), "data_kind": ds.kind, "dropout": dropout,
              "trainable_params": trainable, "params": sum(p.numel() for p in model.parameters()),
              "target_modules": sorted(model.peft_config["default"].target_modules or []),
              "target_parameters": sorted(model.peft_config["default"].target_parameters or []),
              "dropped": ds.dropped},
    )

"""method: pretrain — next-token prediction on packed token shards.

From scratch on a preset (dense Llama sizes or a Qwen2-MoE / DeepSeek-V3 MoE, see
``models.presets``) or continued from a local checkpoint (``model.path``). The token stream
is cut into windows of ``seq_len`` (``train.data.WindowSource``); for MoE models the
router's load-balancing loss is added to the loss and logged as ``moe_aux_loss``, with
``router_balance`` (max / mean expert load).
"""

from __future__ import annotations

from pathlib import Path

from homeforge.errors import HomeforgeError
from homeforge.train.methods.common import (
    RouterMonitor,
    build_causal_lm,
    causal_lm_loss,
    check_token_range,
    moe_flops_per_token,
    open_dataset,
    with_router_metrics,
)


def text_sources(cfg, ds):
    """(train, val) window sources over the packed shards (val is None without a val split)."""
    from homeforge.train.data import WindowSource

    train_tokens = ds.reader.tokens("train")
    if len(train_tokens) <= cfg.seq_len:
        raise HomeforgeError(f"the train split has {len(train_tokens)} tokens, fewer than one sequence of "
                             f"seq_len={cfg.seq_len}", where=str(ds.root), fix="lower train.seq_len or add data")
    train = WindowSource(train_tokens, cfg.seq_len, seed=cfg.seed, shuffle=True)
    val = None
    if ds.has_split("val"):
        val_tokens = ds.reader.tokens("val")
        if len(val_tokens) > cfg.seq_len:
            val = WindowSource(val_tokens, cfg.seq_len, seed=cfg.seed, shuffle=False)
    return train, val


def save_causal_lm(model, out_dir: Path, tokenizer) -> None:
    from homeforge.models.io import save_model_dir

    router = getattr(model.config, "output_router_logits", None)
    if router:
        model.config.output_router_logits = False  # inference does not need router logits
    try:
        save_model_dir(model, tokenizer, out_dir)
    finally:
        if router:
            model.config.output_router_logits = router


def build_task(cfg, data_dir):
    ds = open_dataset(data_dir, "pretrain")
    model, model_dir = build_causal_lm(cfg, ds)
    n_emb = model.get_input_embeddings().num_embeddings
    check_token_range(ds, ds.vocab_size - 1, n_emb, str(ds.root / "index.json"))
    train, val = text_sources(cfg, ds)
    return causal_lm_task(cfg, ds, model, model_dir, train, val, method="pretrain",
                          preset=None if model_dir else cfg.model.preset)


def causal_lm_task(cfg, ds, model, model_dir, train, val, **info):
    """The TrainTask of a causal LM (pretrain, SFT): router metrics for MoE models, FLOPs of the
    active experts, the model saved as an HF directory; ``info`` joins the run's record."""
    from homeforge.train.task import TrainTask

    monitor = RouterMonitor(model)
    return TrainTask(
        model=model, train=train, val=val,
        loss_fn=with_router_metrics(causal_lm_loss, monitor),
        save_final=save_causal_lm, tokenizer=ds.tokenizer,
        flops_per_token=moe_flops_per_token(model, cfg.seq_len),
        info={"architecture": type(model).__name__, "base": str(model_dir) if model_dir else None, **info,
              "params": sum(p.numel() for p in model.parameters()), "moe": bool(monitor)},
    )

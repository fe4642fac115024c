"""What the methods share: opening datasets, building models, checking they match, LM losses.

Datasets follow the layout of docs/DEVELOPING.md (``index.json`` with ``kind`` and
``vocab_size``, a ``tokenizer/`` directory, ``{split}.bin`` for text and
``{split}.tokens.jsonl`` for chat and classification).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from homeforge.errors import HomeforgeError

IGNORE = -100
METHOD_KINDS = {"pretrain": ("text",), "sft": ("chat",), "lora": ("chat", "text"), "classify": ("classification",)}
KIND_HINT = {"text": "pretrain (or lora)", "chat": "sft or lora", "classification": "classify"}


# --------------------------------------------------------------------------- datasets


@dataclass
class Dataset:
    root: Path
    index: dict
    kind: str
    tokenizer: Any
    dropped: dict[str, int] = field(default_factory=dict)  # records dropped by reason, per split
    reader: Any = None  # the data.dataset.DatasetReader every file is read (and checked) through

    @property
    def vocab_size(self) -> int:
        return int(self.index.get("vocab_size") or len(self.tokenizer))

    def has_split(self, split: str) -> bool:
        return split in self.index.get("splits", {})


def open_dataset(data_dir: str | Path | None, method: str) -> Dataset:
    """Open a dataset artifact (``data.dataset.DatasetReader``) and check that its kind suits ``method``."""
    from homeforge.data.dataset import DatasetReader

    if data_dir is None:
        raise HomeforgeError(f"method {method!r} needs a dataset and train.data is not set",
                             fix="pass --data DIR (a directory made by `homeforge prepare`) or set train.data")
    reader = DatasetReader.open(data_dir)
    kind = reader.kind
    allowed = METHOD_KINDS[method]
    if kind not in allowed:
        raise HomeforgeError(
            f"dataset {reader.root} is of kind {kind!r} but method {method!r} trains on {' or '.join(allowed)} data",
            where=str(reader.root / "index.json"),
            fix=f"use method {KIND_HINT.get(kind, '?')} for {kind} data, or prepare the data with "
                f"kind={allowed[0]}",
        )
    return Dataset(root=reader.root, index=reader.index, kind=kind, tokenizer=reader.tokenizer, reader=reader)


def read_token_records(ds: Dataset, split: str, fields: tuple[str, ...]) -> list[dict]:
    """Records of ``{split}.tokens.jsonl`` (chat: input_ids + loss_mask; classification: input_ids + label)."""
    from homeforge.data.dataset import DatasetReader

    reader = ds.reader or DatasetReader(ds.root, ds.index, None)  # a Dataset made by hand: no manifest to check
    return reader.token_records(split, fields)


def check_token_range(ds: Dataset, max_id: int, n_embeddings: int, where: str) -> None:
    if max_id >= n_embeddings:
        raise HomeforgeError(
            f"the dataset holds token id {max_id} but the model's vocabulary has only {n_embeddings} entries",
            where=where, fix="prepare the data with the model's own tokenizer (prepare tokenizer.from_dir=MODEL_DIR)")


# --------------------------------------------------------------------------- models


def check_tokenizers_match(ds: Dataset, model_tok, model_dir: Path, n_embeddings: int) -> None:
    """The dataset must have been tokenized with the model's tokenizer (same vocabulary)."""
    if ds.vocab_size > n_embeddings:
        raise HomeforgeError(
            f"dataset vocabulary ({ds.vocab_size} tokens) is larger than the model's embedding table "
            f"({n_embeddings} rows)", where=f"{ds.root} vs {model_dir}",
            fix="prepare the data with the model's tokenizer (prepare tokenizer.from_dir=MODEL_DIR)")
    if model_tok is not None and model_tok.get_vocab() != ds.tokenizer.get_vocab():
        a, b = model_tok.get_vocab(), ds.tokenizer.get_vocab()
        differ = sum(1 for t, i in b.items() if a.get(t) != i) + sum(1 for t in a if t not in b)
        raise HomeforgeError(
            f"the dataset was tokenized with a different tokenizer than the model's ({len(b)} vs {len(a)} tokens, "
            f"{differ} differ)", where=f"{ds.root}/tokenizer vs {model_dir}",
            fix="re-run `homeforge prepare` with the model's tokenizer (prepare tokenizer.from_dir=MODEL_DIR)")


def build_causal_lm(cfg, ds: Dataset):
    """(model, model_dir or None): a local checkpoint (``model.path``) or a preset built from scratch."""
    from homeforge.models.io import check_model_dir, load_causal_lm
    from homeforge.models.presets import build_model, preset_config

    if cfg.model.path:
        model_dir = check_model_dir(cfg.model.path)
        model, tok = load_causal_lm(model_dir, with_tokenizer=_has_tokenizer(model_dir), dequantize=True)
        if cfg.model.overrides:
            raise HomeforgeError("model.overrides only apply to presets built from scratch",
                                 fix="remove model.overrides, or use model.preset instead of model.path")
        check_tokenizers_match(ds, tok, model_dir, model.get_input_embeddings().num_embeddings)
        enable_router_aux_loss(model)
        model.train()
        return model, model_dir
    if not cfg.model.preset:
        raise HomeforgeError("no model given", fix="set model.path (a local HF directory) or model.preset")
    tok = ds.tokenizer
    config = preset_config(cfg.model.preset, ds.vocab_size, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           overrides=cfg.model.overrides)
    return build_model(config, seed=cfg.seed).train(), None


def enable_router_aux_loss(model) -> None:
    """MoE checkpoints with a load-balancing loss (Qwen2-MoE, Mixtral, ...) return it when asked."""
    cfg = model.config
    if hasattr(cfg, "output_router_logits") and getattr(cfg, "router_aux_loss_coef", 0):
        cfg.output_router_logits = True


def _has_tokenizer(p: Path) -> bool:
    return (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()


def unwrap(model):
    """The module inside DDP / FSDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


# --------------------------------------------------------------------------- losses


@contextmanager
def only_positions(model, keep: torch.Tensor):
    """Compute the LM head only on ``keep`` positions (a bool mask over batch x time).

    A forward pre-hook on the output embedding hands it the selected hidden states
    ([N, hidden]), so logits are [N, vocab]: no memory or FLOPs spent on positions that
    bear no loss (prompts, padding). Works through PEFT, DDP and FSDP wrappers.
    """
    head = unwrap(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0][keep],) + tuple(args[1:]))
    try:
        yield
    finally:
        handle.remove()


def packed_attention_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, T, T] (True = attend) for rows whose positions restart at 0.

    The same mask transformers derives from ``position_ids`` alone (tested equal), built
    with three tensor ops instead of its mask-function machinery (~1 ms instead of ~3-4 ms
    for 2 x 1024 tokens on this CPU, warm). Only for SDPA; flash-attention takes the
    position ids as they are.
    """
    seg = (position_ids == 0).cumsum(-1)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def _attn_impl(model) -> str | None:
    return getattr(getattr(unwrap(model), "config", None), "_attn_implementation", None)


def causal_lm_loss(model, batch: dict[str, torch.Tensor]):
    """Summed next-token loss over positions with a label (``labels`` aligned with inputs)."""
    from homeforge.train.task import StepLoss

    labels = batch["labels"]
    keep = labels != IGNORE
    n = int(keep.sum())
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}
    config = getattr(unwrap(model), "config", None)
    if ("position_ids" in kwargs and "attention_mask" not in kwargs and _attn_impl(model) == "sdpa"
            and not getattr(config, "output_router_logits", False)):  # MoE aux losses read a 2-D mask
        kwargs["attention_mask"] = packed_attention_mask(kwargs["position_ids"])
    if bool(keep.all()):
        out = model(**kwargs, use_cache=False)
        logits, targets = out.logits.reshape(-1, out.logits.size(-1)), labels.reshape(-1)
    else:
        with only_positions(model, keep):
            out = model(**kwargs, use_cache=False)
        logits, targets = out.logits.reshape(-1, out.logits.size(-1)), labels[keep]
    loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
    metrics = {}
    aux = getattr(out, "aux_loss", None)
    if aux is not None and torch.is_tensor(aux):
        coef = float(getattr(unwrap(model).config, "router_aux_loss_coef", 0.0) or 0.0)
        loss_sum = loss_sum + coef * aux.float() * max(n, 1)
        metrics["moe_aux_loss"] = float(aux.detach())
    return StepLoss(loss_sum, n, metrics)


# --------------------------------------------------------------------------- MoE router balance


class RouterMonitor:
    """Counts how many tokens each routed expert receives (forward hooks on the routers).

    ``balance()`` = max expert load / mean expert load over the last forward, averaged over
    MoE layers (1.0 = perfectly balanced, ``num_experts / top_k`` = everything on the same
    experts). Works for any router that returns ``(logits, weights, indices)`` (Qwen2-MoE,
    DeepSeek-V3 and their relatives in transformers 5).
    """

    def __init__(self, model):
        self.counts: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, mod in model.named_modules():
            n_exp = getattr(mod, "num_experts", None)
            if name.endswith(".gate") and n_exp and hasattr(mod, "top_k"):
                self.handles.append(mod.register_forward_hook(self._hook(name, int(n_exp))))

    def __bool__(self) -> bool:
        return bool(self.handles)

    def _hook(self, name: str, n_exp: int):
        def hook(_mod, _args, out):
            if isinstance(out, tuple) and len(out) == 3:
                self.counts[name] = torch.bincount(out[2].detach().reshape(-1).cpu(), minlength=n_exp)

        return hook

    def reset(self) -> None:
        self.counts.clear()

    def balance(self) -> float | None:
        vals = [float(c.max()) / float(c.float().mean()) for c in self.counts.values() if c.sum() > 0]
        return sum(vals) / len(vals) if vals else None


def with_router_metrics(loss_fn, monitor: RouterMonitor | None):
    """Wrap ``loss_fn`` so that it also reports ``router_balance`` for MoE models."""
    if not monitor:
        return loss_fn

    def wrapped(model, batch):
        monitor.reset()
        res = loss_fn(model, batch)
        bal = monitor.balance()
        if bal is not None:
            res.metrics["router_balance"] = bal
        return res

    return wrapped


def moe_flops_per_token(model, seq_len: int) -> float | None:
    """Training FLOPs per token counting only the experts a token is routed to (None if dense)."""
    from homeforge.train.flops import flops_per_token

    cfg = getattr(unwrap(model), "config", None)
    n_exp = getattr(cfg, "num_experts", None) or getattr(cfg, "n_routed_experts", None)
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if not n_exp or not top_k:
        return None
    total = flops_per_token(model, seq_len)
    inactive = 0.0
    for _name, p in model.named_parameters():
        if p.ndim == 3 and p.shape[0] == n_exp:
            inactive += (6.0 if p.requires_grad else 4.0) * p.numel() * (1 - top_k / n_exp)
    return total - inactive


def seeded_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)

"""Elastic weight consolidation (Kirkpatrick et al., 2017) against forgetting.

The diagonal (empirical) Fisher information of the champion on its old data says how much
each weight mattered there; fine-tuning then pays ``lam / 2 * sum F_i (w_i - w*_i)^2`` for
moving weight ``i`` away from the champion's value ``w*_i``. With LoRA the moved weight is the
adapter's delta ``scale * B @ A`` on the frozen base weight (anchor: a zero delta).

The Fisher travels with the model (``MODEL/ewc/fisher.safetensors``): a candidate stores
``decay * F_old + F_new`` so the next round of learning protects both what the champion
protected and what it learned since (online EWC).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from homeforge.errors import HomeforgeError

FISHER_FILE = "ewc/fisher.safetensors"


def _base_name(name: str) -> str:
    """A parameter's name in the plain model, whatever wrappers (PEFT, DDP) it sits in."""
    for prefix in ("module.", "_orig_mod.", "base_model.model."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer.", ".")


def estimate_fisher(model, batches: Iterable[dict], loss_fn, max_samples: int = 64) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of ``model``: the mean over samples of the squared gradient of each
    sample's mean token loss. ``batches`` yield dicts for ``loss_fn`` (``train.loop.StepLoss``); every
    row is taken as one sample. Gradients are taken for every floating-point weight (all set trainable
    while estimating, restored afterwards)."""
    params = {_base_name(n): p for n, p in model.named_parameters()
              if p.is_floating_point() and ".lora_" not in n}  # LoRA: the Fisher of the base weights
    before = {n: p.requires_grad for n, p in params.items()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it predicts
    n = 0
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            rows = next(iter(batch.values())).shape[0]
            for r in range(rows):
                if n >= max_samples:
                    break
                model.zero_grad(set_to_none=True)
                out = loss_fn(model, {k: v[r:r + 1] for k, v in batch.items()})
                if out.n_tokens == 0:
                    continue
                (out.loss_sum / out.n_tokens).backward()
                for name, p in params.items():
                    if p.grad is not None:
                        fisher[name] += p.grad.detach().float() ** 2
                n += 1
            if n >= max_samples:
                break
    finally:
        model.zero_grad(set_to_none=True)
        for name, p in params.items():
            p.requires_grad_(before[name])
        model.train(was_training)
    if n == 0:
        raise HomeforgeError("no sample to estimate the Fisher information on (the old data is empty)",
                             fix="pass old data with at least one full sequence (--old-data)")
    return {k: v / n for k, v in fisher.items() if v.any()}


def save_fisher(fisher: dict[str, torch.Tensor], model_dir: str | Path, meta: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(model_dir) / FISHER_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in fisher.items()}, str(out),
              metadata={k: str(v) for k, v in (meta or {}).items()})
    return out


def load_fisher(model_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """The Fisher stored with a model (decrypted when the artifact is encrypted), or None."""
    f = Path(model_dir) / FISHER_FILE
    if not f.is_file():
        return None
    from homeforge.security.storage import load_safetensors

    return {k: v.float() for k, v in load_safetensors(f).items()}


def combine(old: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor], decay: float) -> dict[str, torch.Tensor]:
    """Online EWC: ``decay * old + new`` (names missing on one side count as zero)."""
    if not old:
        return dict(new)
    out = {k: decay * v for k, v in old.items()}
    for k, v in new.items():
        out[k] = out[k] + v if k in out and out[k].shape == v.shape else v
    return out


class EWC:
    """The penalty ``lam / 2 * sum F (w - w*)^2`` over the trainable weights of ``model``.

    Built after the method's task (LoRA applied or not) and before training: the anchors
    ``w*`` are the weights as they are now. Full fine-tuning: one term per trainable weight
    the Fisher knows. LoRA: one term per adapted layer, on the adapter's delta weight.
    """

    def __init__(self, model, fisher: dict[str, torch.Tensor], lam: float):
        self.lam = float(lam)
        self.terms: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (param, F, anchor)
        self.lora: list[tuple[torch.nn.Module, str, torch.Tensor]] = []  # (lora layer, adapter, F of its weight)
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_A") and hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer"):
                key = _base_name(name) + ".weight"
                for adapter in mod.lora_A:
                    if key in fisher and fisher[key].shape == mod.base_layer.weight.shape:
                        self.lora.append((mod, adapter, fisher[key]))
        for name, p in model.named_parameters():
            key = _base_name(name)
            if p.requires_grad and key in fisher and fisher[key].shape == p.shape:
                self.terms.append((p, fisher[key].to(p.device), p.detach().clone()))
        if not self.terms and not self.lora:
            raise HomeforgeError("the Fisher information covers none of the weights being trained",
                                 fix="estimate it on this model (drop the stored ewc/fisher.safetensors) or turn "
                                     "EWC off (ewc.lam=0)")

    def penalty(self) -> torch.Tensor:
        total = torch.zeros(())
        for p, f, anchor in self.terms:
            total = total + (f * (p - anchor) ** 2).sum()
        for mod, adapter, f in self.lora:
            delta = mod.get_delta_weight(adapter)
            total = total + (f.to(delta.device) * delta.float() ** 2).sum()
        return 0.5 * self.lam * total

    def wrap(self, loss_fn):
        """``loss_fn`` plus the penalty (scaled by the micro-batch's token count: the engine divides the
        step's summed loss by its tokens, so the step pays the penalty once); logged as ``ewc_penalty``."""
        def wrapped(model, batch):
            out = loss_fn(model, batch)
            pen = self.penalty()
            out.metrics["ewc_penalty"] = float(pen.detach())
            return type(out)(out.loss_sum + pen * max(out.n_tokens, 1), out.n_tokens, out.metrics)

        return wrapped

"""Differential privacy for training: DP-SGD with Opacus (per-sample clipping, Gaussian noise).

``privacy: {epsilon, delta, max_grad_norm, accountant}`` in a training config turns it on.
The engine (``train/loop.py``) calls ``make_private`` once, after the optimizer is built;
it returns Opacus' ``GradSampleModule`` and ``DPOptimizer``:

* the noise multiplier is the smallest one with which the whole run (``max_steps``
  optimizer steps at sampling rate ``micro_batch_size * grad_accum / len(train)``) spends
  at most ``epsilon`` at ``delta``, found by Opacus' ``get_noise_multiplier``; a budget
  that cannot be met is refused before training starts;
* per-sample gradients come from the method's summed loss (``loss_reduction="sum"``),
  each is clipped to ``max_grad_norm``, noise ``N(0, (sigma * max_grad_norm)^2)`` is added
  to their sum, which is then divided by the expected batch size (mean);
* the accountant is stepped by the optimizer; the spent epsilon is logged with every
  metrics record (``dp_epsilon``) and written into the model manifest
  (``task.privacy``: target and spent epsilon, delta, noise multiplier, sample rate, steps).

What Opacus supports here (checked on the HF Llama used by homeforge, see
tests/security/test_privacy.py): ``nn.Linear`` and ``nn.Embedding`` have Opacus grad
samplers; ``LlamaRMSNorm`` (a custom module with a weight) falls back to Opacus'
functorch per-sample gradients; the tied ``lm_head``/``embed_tokens`` weight receives
the sum of both uses. LoRA adapters are ``nn.Linear`` (supported; the frozen base needs
no per-sample gradients). Not supported: multi-process (DDP/FSDP) DP training, and fp16
loss scaling; both are refused with a message.

Caveat (stated in docs/security.md): the accountant assumes Poisson sampling of each
batch; the engine draws fixed-size batches from a seeded shuffle, the usual practical
approximation (as in most DP-SGD training code), so the reported epsilon is the
standard DP-SGD estimate for these settings, not a proof for shuffled batches.
"""

from __future__ import annotations

import math
import warnings

from homeforge.errors import HomeforgeError


class PrivacyError(HomeforgeError):
    """A differential-privacy setting that cannot be honoured."""


def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier that spends ``epsilon`` over ``steps`` steps (Opacus' search)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                              steps=steps, accountant=accountant, epsilon_tolerance=0.001))
    except ValueError as exc:
        raise PrivacyError(
            f"a privacy budget of epsilon={epsilon} (delta={delta}) cannot be met for {steps} steps at sampling rate "
            f"{sample_rate:.4g}: {exc}",
            fix="raise privacy.epsilon, train fewer steps (max_steps), use smaller batches, or use more training data") from None


def spent_epsilon(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by ``steps`` DP-SGD steps, as Opacus' accountant computes it."""
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    if steps == 0:
        return 0.0
    acc.history = [(sigma, sample_rate, steps)]
    return float(acc.get_epsilon(delta))


def make_private(task, model, optimizer, cfg):
    """Wrap ``model`` and ``optimizer`` for DP-SGD (see the module docstring); returns both."""
    import torch
    from opacus import GradSampleModule
    from opacus.accountants import create_accountant
    from opacus.optimizers import DPOptimizer

    p = cfg.privacy
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise PrivacyError("differential privacy is not supported with several training processes yet",
                           fix="train with one process (no --nproc), or turn privacy off")
    if cfg.precision == "fp16":
        raise PrivacyError("differential privacy does not work with fp16 loss scaling",
                           fix="use precision=fp32 or bf16 with privacy")
    if cfg.activation_checkpointing:
        raise PrivacyError("differential privacy cannot compute per-sample gradients with activation checkpointing",
                           fix="set activation_checkpointing=false")
    n = len(task.train)
    batch = cfg.micro_batch_size * cfg.grad_accum
    if n <= 0 or batch > n:
        raise PrivacyError(f"differential privacy needs more training samples ({n}) than the batch ({batch})",
                           fix="use more data or a smaller micro_batch_size / grad_accum")
    if p.delta >= 1.0 / n:
        raise PrivacyError(f"privacy.delta={p.delta} is not below 1/{n} (one over the number of training samples): "
                           "such a delta allows leaking a whole record",
                           fix=f"set privacy.delta below {1.0 / n:.2g}, e.g. {10 ** math.floor(math.log10(0.1 / n)):.0e}")
    sample_rate = batch / n
    steps = cfg.max_steps
    sigma = noise_multiplier(p.epsilon, p.delta, sample_rate, steps, p.accountant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG and functorch fallbacks
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    dp_opt = DPOptimizer(optimizer, noise_multiplier=sigma, max_grad_norm=p.max_grad_norm,
                         expected_batch_size=cfg.micro_batch_size, loss_reduction="mean")
    accountant = create_accountant(p.accountant)
    dp_opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=cfg.micro_batch_size / n))
    report = {"target_epsilon": p.epsilon, "delta": p.delta, "max_grad_norm": p.max_grad_norm,
              "noise_multiplier": sigma, "sample_rate": sample_rate, "planned_steps": steps,
              "accountant": p.accountant, "epsilon_spent": 0.0, "steps": 0, "library": "opacus"}
    task.info["privacy"] = report
    previous = task.metrics_fn

    def metrics_fn(m) -> dict[str, float]:
        out = dict(previous(m)) if previous is not None else {}
        steps_taken = len(accountant.history) and sum(h[2] for h in accountant.history)
        if steps_taken != report["steps"]:
            report["steps"] = steps_taken
            report["epsilon_spent"] = float(accountant.get_epsilon(p.delta))
        out["dp_epsilon"] = report["epsilon_spent"]
        return out

    task.metrics_fn = metrics_fn
    load_state_dict = dp_opt.load_state_dict

    def load_and_resume_accounting(state_dict) -> None:
        """On resume the engine restores the optimizer: the steps already taken were already spent."""
        load_state_dict(state_dict)
        done = 0
        for st in dp_opt.original_optimizer.state.values():
            if isinstance(st, dict) and "step" in st:
                done = max(done, int(float(st["step"])))
        if done:
            accountant.history = [(sigma, sample_rate, done)]

    dp_opt.load_state_dict = load_and_resume_accounting
    private_step = dp_opt.step

    def step(closure=None):
        # torch.distributed.checkpoint initialises optimizer state on resume with one step on all-zero
        # gradients at lr 0 (no backward, so no per-sample gradients): that is not a training step.
        params = dp_opt.params
        if all(getattr(q, "grad_sample", None) is None for q in params) and all(
                q.grad is None or not q.grad.any() for q in params):
            return dp_opt.original_optimizer.step(closure)
        return private_step(closure)

    dp_opt.step = step
    save_final = task.save_final
    task.save_final = lambda m, out, tok: save_final(m._module if isinstance(m, GradSampleModule) else m, out, tok)
    task.dp_accountant = accountant  # for tests and callers that want the live accountant
    return gsm, dp_opt

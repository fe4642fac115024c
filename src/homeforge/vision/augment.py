"""Batch augmentation on float images in [0, 1] (NCHW), after ``torchvision.transforms.v2``.

torchvision's wheel for torch 2.13 on the package index here is built against the CUDA
torch and does not load beside the CPU torch (its compiled operators fail to register), so
the four transforms the training needs are written here on plain tensors, with the same
names, parameters and defaults as torchvision's:

- ``rand_augment``: ``RandAugment(num_ops=2, magnitude=9)`` with the geometric ops (rotate,
  shear x/y, translate x/y) and the colour ops (brightness, contrast, sharpness, posterize,
  solarize, autocontrast) at magnitude / 30 of their ranges, identity included;
- ``random_erasing``: ``RandomErasing(p=0.25, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)``;
- ``cutmix`` / ``mixup``: ``CutMix(alpha=1.0)`` and ``MixUp(alpha=0.2)``, returning soft targets.

Every random draw comes from the ``torch.Generator`` passed in, so a batch is a pure function
of (seed, sample index): exact resume stays exact with augmentation on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OPS = ("identity", "rotate", "shear_x", "shear_y", "translate_x", "translate_y", "brightness", "contrast",
       "sharpness", "posterize", "solarize", "autocontrast")


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.unsqueeze(0), list(x.unsqueeze(0).shape), align_corners=False)
    return F.grid_sample(x.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def _op(x: torch.Tensor, op: str, mag: float, g: torch.Generator) -> torch.Tensor:
    """One op on one image [C, H, W]; ``mag`` in [0, 1] of the op's range, sign drawn at random."""
    s = 1.0 if _u(g) < 0.5 else -1.0
    if op == "identity":
        return x
    if op == "rotate":
        a = math.radians(30.0 * mag * s)
        return _affine(x, torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]))
    if op in ("shear_x", "shear_y"):
        k = 0.3 * mag * s
        t = [[1.0, k, 0.0], [0.0, 1.0, 0.0]] if op == "shear_x" else [[1.0, 0.0, 0.0], [k, 1.0, 0.0]]
        return _affine(x, torch.tensor(t))
    if op in ("translate_x", "translate_y"):
        d = 2 * 0.45 * mag * s * 0.5  # torchvision: up to 150/331 of the side
        t = [[1.0, 0.0, d], [0.0, 1.0, 0.0]] if op == "translate_x" else [[1.0, 0.0, 0.0], [0.0, 1.0, d]]
        return _affine(x, torch.tensor(t))
    if op == "brightness":
        return (x * (1 + 0.9 * mag * s)).clamp(0, 1)
    if op == "contrast":
        mean = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).mean() if x.shape[0] == 3 else x.mean()
        return ((x - mean) * (1 + 0.9 * mag * s) + mean).clamp(0, 1)
    if op == "sharpness":
        k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13
        blur = F.conv2d(x.unsqueeze(1), k.view(1, 1, 3, 3), padding=1)[:, 0]
        return (blur + (x - blur) * (1 + 0.9 * mag * s)).clamp(0, 1)
    if op == "posterize":
        bits = max(1, int(round(8 - 4 * mag)))
        q = 2 ** (8 - bits)
        return torch.floor(x * 255 / q) * q / 255
    if op == "solarize":
        thr = 1.0 - mag
        return torch.where(x >= thr, 1 - x, x)
    if op == "autocontrast":
        lo = x.amin(dim=(1, 2), keepdim=True)
        hi = x.amax(dim=(1, 2), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-6), x)
    raise ValueError(op)


def rand_augment(x: torch.Tensor, g: torch.Generator, num_ops: int = 2, magnitude: int = 9) -> torch.Tensor:
    """RandAugment on a batch [B, C, H, W]: ``num_ops`` ops drawn per image, at ``magnitude`` of 30 levels."""
    out = x.clone()
    for b in range(x.shape[0]):
        for _ in range(num_ops):
            op = OPS[int(torch.randint(len(OPS), (), generator=g))]
            out[b] = _op(out[b], op, magnitude / 30.0, g)
    return out


def random_erasing(x: torch.Tensor, g: torch.Generator, p: float = 0.25, scale=(0.02, 0.33), ratio=(0.3, 3.3),
                   value: float = 0.0) -> torch.Tensor:
    out = x.clone()
    _, _, h, w = x.shape
    for b in range(x.shape[0]):
        if _u(g) >= p:
            continue
        for _ in range(10):
            area = h * w * _u(g, *scale)
            r = math.exp(_u(g, math.log(ratio[0]), math.log(ratio[1])))
            eh, ew = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if 0 < eh < h and 0 < ew < w:
                i, j = int(_u(g) * (h - eh + 1)), int(_u(g) * (w - ew + 1))
                out[b, :, i:i + eh, j:j + ew] = value
                break
    return out


def _beta(g: torch.Generator, alpha: float) -> float:
    a = torch._standard_gamma(torch.tensor([alpha, alpha]), generator=g)  # Beta via two Gammas
    return float(a[0] / a.sum())


def mixup(x: torch.Tensor, y: torch.Tensor, n_classes: int, g: torch.Generator, alpha: float = 0.2):
    """(images, soft targets): the batch blended with itself rolled by one, weight ~ Beta(alpha, alpha)."""
    lam = _beta(g, alpha)
    t = F.one_hot(y, n_classes).float()
    return lam * x + (1 - lam) * x.roll(1, 0), lam * t + (1 - lam) * t.roll(1, 0)


def cutmix(x: torch.Tensor, y: torch.Tensor, n_classes: int, g: torch.Generator, alpha: float = 1.0):
    """(images, soft targets): a box of the rolled batch pasted in; targets weighted by the box's area."""
    lam = _beta(g, alpha)
    _, _, h, w = x.shape
    rh, rw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(_u(g) * h), int(_u(g) * w)
    y0, y1, x0, x1 = max(cy - rh // 2, 0), min(cy + rh // 2, h), max(cx - rw // 2, 0), min(cx + rw // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x.roll(1, 0)[:, :, y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    t = F.one_hot(y, n_classes).float()
    return out, lam * t + (1 - lam) * t.roll(1, 0)

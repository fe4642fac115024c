"""Image+text classifiers: a tiny BERT text encoder built from a config, fused with a tiny image backbone,
trained by the engine, evaluated, and served with an image and its text over HTTP."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
import torch

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "river", "mountain", "market", "note", "filed", "under", "from", "the"]


@pytest.fixture(scope="module")
def tiny_text_encoder(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("enc")
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(str(d))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def fusion_run(image_tree, tiny_text_encoder, tmp_path_factory):
    from rich.console import Console

    from homeforge.config import PrepareConfig, TrainConfig, load_config
    from homeforge.train.run import run as train
    from homeforge.vision.prepare import run as prepare

    tmp = tmp_path_factory.mktemp("fus")
    groups = ["river", "mountain", "market"]
    lines = ["image,label,text"] + [f"{image_tree}/d{k}/{i}.png,d{k},note filed under the {groups[k]}"
                                    for k in range(3) for i in range(12)]
    (tmp / "recs.csv").write_text("\n".join(lines) + "\n")
    pcfg = load_config(PrepareConfig, overrides=["kind=image-classification", "image.size=16", "split.val=0.25"])
    prepare(pcfg.model_copy(update={"inputs": [str(tmp / "recs.csv")]}), output=tmp / "ds", console=Console(quiet=True))
    tcfg = load_config(TrainConfig, overrides=[
        "method=image-classify", f"data={tmp / 'ds'}", f"output_dir={tmp / 'run'}", "vision.backbone=tiny",
        "vision.weights=null", "vision.fusion=cross", f"vision.text_encoder={tiny_text_encoder}", "max_steps=4",
        "micro_batch_size=8", "threads=1", "tracking.tensorboard=false", "eval_every=100", "vision.randaugment=false"])
    train(tcfg, console=Console(quiet=True))
    return tmp


def test_fusion_modes_forward(tiny_text_encoder):
    from transformers import AutoModel

    from homeforge.vision.nets import BackboneConfig, FusionClassifier

    enc = AutoModel.from_pretrained(str(tiny_text_encoder))
    ids, mask = torch.tensor([[2, 4, 3, 0], [2, 5, 6, 3]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    for fusion in ("late", "cross", "image", "text"):
        m = FusionClassifier(BackboneConfig.named("tiny"), enc, 3, fusion).eval()
        assert m(torch.rand(2, 3, 16, 16), ids, mask).shape == (2, 3)
    m = FusionClassifier(BackboneConfig.named("tiny"), enc, 3, "late").eval()
    a = m(torch.rand(2, 3, 16, 16), ids, mask)
    b = m(torch.rand(2, 3, 16, 16), ids, mask)
    assert not torch.allclose(a, b)  # the image matters
    m.text.requires_grad_(False)
    m.train()
    assert not m.text.training and m.backbone.training  # a frozen encoder stays in eval mode


def test_fusion_trains_evaluates_and_serves(fusion_run, image_tree, tmp_path):
    from PIL import Image
    from tests.serve.conftest import running_server

    from homeforge.config import ServeConfig
    from homeforge.vision.evaluate import evaluate

    model_dir = fusion_run / "run" / "model"
    meta = json.loads((model_dir / "vision.json").read_text())
    assert meta["fusion"] == "cross" and (model_dir / "text_encoder" / "tokenizer.json").is_file()
    r = evaluate(model_dir, fusion_run / "ds", "val")
    assert r["n"] > 0 and 0 <= r["accuracy"] <= 1
    buf = io.BytesIO()
    Image.open(image_tree / "d1" / "3.png").save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    scfg = ServeConfig(model_dir=str(model_dir), keys_file=str(tmp_path / "k.json"))
    with running_server(scfg) as (base, _):
        ok = httpx.post(base + "/v1/classifications", json={"image": [img, img], "input": ["the river", "market"]})
        assert ok.status_code == 200, ok.text
        data = ok.json()["data"]
        assert len(data) == 2 and all(abs(sum(d["scores"].values()) - 1) < 1e-5 for d in data)
        no_text = httpx.post(base + "/v1/classifications", json={"image": img})
        assert no_text.status_code == 400 and no_text.json()["error"]["param"] == "input"
        mismatch = httpx.post(base + "/v1/classifications", json={"image": [img], "input": ["a", "b"]})
        assert mismatch.status_code == 400


@pytest.mark.slow  # the dynamo exporter on BERT: ~15-30 s
def test_fusion_onnx_export_parity_and_serving(fusion_run, image_tree, tmp_path):
    from PIL import Image
    from rich.console import Console
    from tests.serve.conftest import running_server

    from homeforge.config import ServeConfig
    from homeforge.vision.evaluate import run_export

    r = run_export(fusion_run / "run" / "model", tmp_path / "onnx", int8=False, force=False,
                   console=Console(quiet=True))
    assert r["max_abs_diff"] < 1e-4 and r["top1_agreement"] == 1.0 and r["checked_on"].startswith("validation")
    buf = io.BytesIO()
    Image.open(image_tree / "d2" / "1.png").save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    body = {"image": [img, img], "input": ["the market", "filed under the river note"]}
    got = {}
    for name, d in (("torch", fusion_run / "run" / "model"), ("onnx", tmp_path / "onnx")):
        with running_server(ServeConfig(model_dir=str(d), keys_file=str(tmp_path / "k.json"))) as (base, _):
            resp = httpx.post(base + "/v1/classifications", json=body)
            assert resp.status_code == 200, resp.text
            got[name] = resp.json()["data"]
    for a, b in zip(got["torch"], got["onnx"], strict=True):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-4)

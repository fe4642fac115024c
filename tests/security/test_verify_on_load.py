"""Verify on load: every reader (models, tokenizers, datasets, adapters, exports) checks the manifest before use.

Each case of issue 11 ("Why"): a flipped byte, a truncated or deleted file, an edited config.json /
index.json, an edited manifest; refused with the file named, through the real readers and through the
real CLI entry point (exit 2, no traceback). On the code before verify-on-load these loaded silently or
failed with tracebacks.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from integrity_helpers import (  # noqa: E402
    edit_json,
    flip,
    forge_manifest,
    keys_init,
    run_cli,
    tiny_model_artifact,
    truncate,
)

from homeforge import artifacts, hashcache, integrity  # noqa: E402
from homeforge.integrity import IntegrityError  # noqa: E402


@pytest.fixture(scope="module")
def model_src(tiny_tokenizer, tmp_path_factory):
    return tiny_model_artifact(tmp_path_factory.mktemp("m") / "model", tiny_tokenizer)


@pytest.fixture
def model(model_src, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(model_src, out)
    return out


@pytest.fixture
def dataset(tiny_dataset, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(tiny_dataset, out)
    return out


# --------------------------------------------------------------------------- models


MODEL_DAMAGE = {
    "flipped byte": (lambda m: flip(m / "model.safetensors"), "model.safetensors does not match its recorded hash"),
    "truncated weights": (lambda m: truncate(m / "model.safetensors"), "model.safetensors is truncated"),
    "deleted tokenizer": (lambda m: (m / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    "edited config.json": (lambda m: edit_json(m / "config.json", rms_norm_eps=0.5), "config.json"),
    "edited manifest": (lambda m: edit_json(m / "homeforge.json", metrics={"val_loss": 0.01}),
                        "was edited after it was written"),
    "added weights": (lambda m: shutil.copy(m / "model.safetensors", m / "extra.safetensors"),
                      "extra.safetensors, which its manifest does not list"),
}


@pytest.mark.parametrize("case", list(MODEL_DAMAGE))
def test_model_damage_refused_by_the_loader(model, case):
    from homeforge.models.io import load_causal_lm

    damage, words = MODEL_DAMAGE[case]
    load_causal_lm(model)  # intact: loads
    damage(model)
    with pytest.raises(IntegrityError) as err:
        load_causal_lm(model)
    assert words in err.value.render()
    assert str(model) in err.value.render()


def test_generate_and_eval_refuse_a_flipped_byte_without_traceback(model, dataset, capsys, home):
    """The issue's first case: `verify` failed but `generate` and `eval` exited 0 on the corrupted weights."""
    flip(model / "model.safetensors")
    code, out, err = run_cli(capsys, "generate", model, "--prompt", "def", "--max-new-tokens", "2")
    assert code == 2 and "model.safetensors does not match its recorded hash" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "eval", model, "--data", dataset, "-o", model.parent / "ev",
                             "generation.enabled=false", "robustness.enabled=false", "max_examples=2")
    assert code == 2 and "model.safetensors" in err and "Traceback" not in err
    assert not (model.parent / "ev").exists()


def test_foreign_directory_damage_is_an_error_not_a_traceback(model, capsys, home):
    """A plain HF directory (no manifest): nothing to check against, but a truncated file is still a clear error."""
    (model / "homeforge.json").unlink()
    truncate(model / "model.safetensors")
    code, _, err = run_cli(capsys, "generate", model, "--prompt", "def")
    assert code == 2 and "could not load the model" in err and "Traceback" not in err
    shutil.rmtree(model)


def test_no_verify_loads_and_is_audited(model, capsys, home):
    edit_json(model / "generation_config.json", max_length=77)  # a deliberate expert edit
    code, _, err = run_cli(capsys, "generate", model, "--prompt", "def", "--max-new-tokens", "1")
    assert code == 2 and "generation_config.json" in err
    code, out, err = run_cli(capsys, "--no-verify", "generate", model, "--prompt", "def", "--max-new-tokens", "1")
    assert code == 0, err
    from homeforge.security import audit

    last = list(audit.read_entries())[-1]
    assert "--no-verify" in last["args"] and last["unverified"] == [str(model)]
    assert integrity.verify_enabled()  # the switch is per command


# --------------------------------------------------------------------------- datasets


def test_dataset_shard_with_a_flipped_byte_is_not_trained_on(dataset, capsys, home, tmp_path):
    flip(dataset / "train.bin", 0.3)
    code, _, err = run_cli(capsys, "train", "--data", dataset, "--output", tmp_path / "run", "model.preset=debug",
                           "max_steps=1", "seq_len=16", "micro_batch_size=2", "tracking.tensorboard=false")
    assert code == 2 and "train.bin does not match its recorded hash" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model").exists()


DATA_DAMAGE = {
    "flipped byte": (lambda d: flip(d / "val.bin"), "val.bin does not match"),
    "truncated shard": (lambda d: truncate(d / "train.bin"), "train.bin is truncated"),
    "deleted file": (lambda d: (d / "val.docs.npy").unlink(), "val.docs.npy is missing"),
    "edited index.json": (lambda d: edit_json(d / "index.json", vocab_size=10), "index.json is"),
    "same-size edit of index.json": (lambda d: (d / "index.json").write_text(
        (d / "index.json").read_text().replace('"text"', '"chat"')), "index.json does not match"),
    "edited records": (lambda d: flip(d / "val.jsonl", 0.5), "val.jsonl does not match"),
    "edited manifest": (lambda d: edit_json(d / "homeforge.json", kind="chat"), "was edited after it was written"),
    "deleted tokenizer": (lambda d: (d / "tokenizer" / "tokenizer.json").unlink(), "tokenizer.json is missing"),
}


@pytest.mark.parametrize("case", list(DATA_DAMAGE))
def test_dataset_damage_refused_by_the_reader(dataset, case):
    from homeforge.data.dataset import DatasetReader

    damage, words = DATA_DAMAGE[case]
    damage(dataset)
    with pytest.raises(IntegrityError) as err:
        ds = DatasetReader.open(dataset)
        _ = ds.tokenizer
        for split in ("train", "val"):
            np.asarray(ds.tokens(split)[:4])
        ds.records("val", limit=2)
    assert words in err.value.render()


def test_dataset_reader_checks_only_what_it_reads(dataset):
    """eval reads records, not token shards: a damaged shard does not stop a records read, and is refused when read."""
    from homeforge.data.dataset import DatasetReader

    flip(dataset / "train.bin")
    ds = DatasetReader.open(dataset)
    assert ds.records("val", limit=3)
    with pytest.raises(IntegrityError, match="train.bin"):
        ds.tokens("train")


# --------------------------------------------------------------------------- adapters and exports


@pytest.fixture
def adapter(tmp_path):
    from homeforge.models.lora import apply_lora, save_adapter
    from homeforge.models.presets import build_model, preset_config

    base = build_model(preset_config("debug", 96, eos_token_id=0), seed=0)
    peft_model = apply_lora(base, r=4, dropout=0.0, seed=0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    with artifacts.write_artifact(tmp_path / "lora", stage="train", config={}) as art:
        save_adapter(peft_model, art.dir / "adapter")
    return tmp_path / "lora" / "adapter", lambda: build_model(preset_config("debug", 96, eos_token_id=0), seed=0)


@pytest.mark.parametrize("case", ["flipped byte", "edited adapter_config.json", "deleted weights", "edited manifest"])
def test_adapter_damage_refused(adapter, case):
    from homeforge.models.lora import load_adapter

    path, base = adapter
    load_adapter(base(), path)
    {"flipped byte": lambda: flip(path / "adapter_model.safetensors"),
     "edited adapter_config.json": lambda: edit_json(path / "adapter_config.json", lora_alpha=64),
     "deleted weights": lambda: (path / "adapter_model.safetensors").unlink(),
     "edited manifest": lambda: edit_json(path.parent / "homeforge.json", config={"lr": 1})}[case]()
    with pytest.raises(IntegrityError) as err:
        load_adapter(base(), path)
    assert str(path.parent) in err.value.render()


def _onnx_export(out: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4], np.arange(4, dtype=np.float32).tolist())
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    with artifacts.write_artifact(out, stage="export-onnx", config={}) as art:
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(art.dir / "model.onnx"))
        (art.dir / "config.json").write_text("{}")
    return out / "model.onnx"


@pytest.mark.parametrize("case", ["flipped byte", "truncated", "edited manifest"])
def test_export_damage_refused(tmp_path, case):
    pytest.importorskip("onnxruntime")
    from homeforge.export.onnx import session

    onnx_file = _onnx_export(tmp_path / "exp")
    sess = session(onnx_file)
    assert sess.run(None, {"x": np.ones(4, dtype=np.float32)})[0].tolist() == [1, 2, 3, 4]
    {"flipped byte": lambda: flip(onnx_file, 0.9), "truncated": lambda: truncate(onnx_file),
     "edited manifest": lambda: edit_json(onnx_file.parent / "homeforge.json", stage="export-hf")}[case]()
    with pytest.raises(IntegrityError) as err:
        session(onnx_file)
    assert str(onnx_file.parent) in err.value.render()


def test_gguf_in_an_export_is_checked_before_import(tmp_path):
    gguf = pytest.importorskip("gguf")
    from homeforge.export.importer import load_gguf

    with artifacts.write_artifact(tmp_path / "exp", stage="export-gguf", config={}) as art:
        w = gguf.GGUFWriter(str(art.dir / "model.gguf"), "llama")
        w.add_tensor("t", np.ones(8, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    flip(tmp_path / "exp" / "model.gguf", 0.95)
    with pytest.raises(IntegrityError, match="model.gguf does not match"):
        load_gguf(tmp_path / "exp" / "model.gguf")


# --------------------------------------------------------------------------- the seal


def test_manifest_seal_covers_every_field(model):
    m = artifacts.verify(model)
    assert m["seal"]["digest"] and "hmac" not in m["seal"]  # no key on this machine
    for field, value in (("config", {"preset": "tiny"}), ("inputs", {"dataset": "0" * 64}),
                         ("metrics", {"val_loss": 0.0}), ("task", {"privacy": {"epsilon": 0.1}}),
                         ("resumed_from", []), ("audit", {"seq": 1, "hash": "0" * 64}),
                         ("input_paths", {"dataset": {"path": "/elsewhere"}})):
        doc = json.loads((model / "homeforge.json").read_text())
        doc[field] = value
        (model / "homeforge.json").write_text(json.dumps(doc))
        with pytest.raises(IntegrityError, match="edited after it was written"):
            artifacts.verify(model)
        (model / "homeforge.json").write_text(json.dumps(m, indent=2))
    artifacts.verify(model)


def test_forged_manifest_refused_when_a_key_exists(home, tiny_tokenizer, tmp_path):
    """With a signing key, recomputing the digest is not enough: the HMAC is needed, and so is the key."""
    from homeforge.models.io import load_causal_lm

    keys_init(home)
    model = tiny_model_artifact(tmp_path / "signed", tiny_tokenizer)
    seal = json.loads((model / "homeforge.json").read_text())["seal"]
    assert seal["key"] == "audit" and len(seal["hmac"]) == 64
    load_causal_lm(model, with_tokenizer=False)
    forge_manifest(model, metrics={"val_loss": 0.01})  # attacker: digest recomputed, signature dropped
    with pytest.raises(IntegrityError, match="not signed"):
        load_causal_lm(model, with_tokenizer=False)
    doc = json.loads((model / "homeforge.json").read_text())
    doc["seal"].update(key="audit", key_id=seal["key_id"], hmac="0" * 64)  # attacker: a made-up signature
    (model / "homeforge.json").write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="forged signature"):
        load_causal_lm(model, with_tokenizer=False)


def test_old_manifests_read_without_key_refused_with_key_until_adopted(home, model, capsys):
    from homeforge.models.io import load_causal_lm

    doc = json.loads((model / "homeforge.json").read_text())
    doc.pop("seal")
    doc["format"] = 1
    (model / "homeforge.json").write_text(json.dumps(doc))  # as written by an older homeforge
    load_causal_lm(model, with_tokenizer=False)  # no key here: read (files still checked)
    keys_init(home)
    with pytest.raises(IntegrityError, match="not signed") as err:
        load_causal_lm(model, with_tokenizer=False)
    assert "verify --adopt" in err.value.render()
    code, out, err_ = run_cli(capsys, "verify", "--adopt", model)
    assert code == 0 and "adopted" in out, err_
    load_causal_lm(model, with_tokenizer=False)
    flip(model / "model.safetensors")  # adoption re-checks every file: a damaged artifact is never signed
    doc = json.loads((model / "homeforge.json").read_text())
    doc.pop("seal")
    (model / "homeforge.json").write_text(json.dumps(doc))
    code, _, err_ = run_cli(capsys, "verify", "--adopt", model)
    assert code == 2 and "model.safetensors does not match" in err_


# --------------------------------------------------------------------------- the verified-hash cache


def test_cache_is_not_fooled_by_a_same_size_rewrite_with_the_old_mtime(model, home, monkeypatch):
    from homeforge.models.io import load_causal_lm

    monkeypatch.setattr(hashcache, "RACY_SECONDS", 0.0)  # the files were just written
    monkeypatch.setattr(hashcache, "FINE_RACY_SECONDS", 0.0)
    w = model / "model.safetensors"
    integrity.file_digest(w)
    calls = []
    real = hashcache.hashlib.sha256
    monkeypatch.setattr(hashcache.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    load_causal_lm(model, with_tokenizer=False)
    assert integrity.file_digest(w)[0] == artifacts.read_manifest(model)["files"]["model.safetensors"]
    n = len(calls)
    integrity.file_digest(w)
    assert len(calls) == n  # served from the cache
    st = w.stat()
    flip(w)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before; ctime cannot be set back
    assert w.stat().st_size == st.st_size and w.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(IntegrityError, match="model.safetensors does not match"):
        load_causal_lm(model, with_tokenizer=False)


def test_hashes_taken_while_writing_serve_the_first_load(tiny_tokenizer, tmp_path, home, monkeypatch):
    """The cache is keyed on the inode: files renamed into place with their artifact keep their entries."""
    from homeforge.models.io import load_causal_lm

    monkeypatch.setattr(hashcache, "RACY_SECONDS", 0.0)
    monkeypatch.setattr(hashcache, "FINE_RACY_SECONDS", 0.0)
    model = tiny_model_artifact(tmp_path / "model", tiny_tokenizer)
    hashed = []
    real = hashcache.hashlib.sha256
    monkeypatch.setattr(hashcache.hashlib, "sha256", lambda *a: (hashed.append(1) if not a else None) or real(*a))
    load_causal_lm(model)
    assert hashed == []  # no file hashed again: every hash was taken when the artifact was written

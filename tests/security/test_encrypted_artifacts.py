"""Encrypted artifacts through the real writers and readers: prepare -> shards/JSONL, train -> checkpoints and
model, load_causal_lm; tamper/wrong key refused; rotation; provenance; CLI bad input."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from homeforge import integrity
from homeforge.integrity import IntegrityError
from homeforge.security import crypto, encrypted_array, keys, storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A key, an encrypted dataset made by the real prepare stage, and an encrypted trained model."""
    from rich.console import Console

    from homeforge.config import QuickstartConfig, load_config
    from homeforge.quickstart import build_dataset

    root = tmp_path_factory.mktemp("enc")
    saved = {k: os.environ.get(k) for k in ("HOMEFORGE_HOME", "HOMEFORGE_ENCRYPT", "HOMEFORGE_KEY_FILE", "HOMEFORGE_KEY")}
    os.environ["HOMEFORGE_HOME"] = str(root / "home")
    os.environ.pop("HOMEFORGE_KEY_FILE", None)
    os.environ.pop("HOMEFORGE_KEY", None)
    key = keys.init_key()
    os.environ["HOMEFORGE_ENCRYPT"] = "1"
    try:
        cfg = load_config(QuickstartConfig, overrides=["corpus.max_chars=60000", "tokenizer.vocab_size=300"])
        data = build_dataset(cfg, root / "data", force=False, console=Console(quiet=True))
        from engine_task import make_cfg

        from homeforge.train.loop import train_task
        from homeforge.train.methods import build_task

        tcfg = make_cfg(root / "run", f"data={data}", "model.preset=debug", "max_steps=4", "checkpoint.every=2",
                        "eval_every=2", "seq_len=32")
        task = build_task(tcfg, data)
        train_task(task, tcfg, root / "run")
        yield {"root": root, "key": key, "data": data, "run": root / "run", "model": root / "run" / "model", "cfg": tcfg}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_dataset_files_are_encrypted_and_read_back(env):
    from homeforge.data.dataset import read_jsonl
    from homeforge.data.shards import load_tokens, read_index

    data = env["data"]
    manifest = json.loads((data / "homeforge.json").read_text())
    enc = manifest["encryption"]
    assert enc["key_id"] == env["key"].key_id and "train.bin" in enc["files"] and "train.jsonl" in enc["files"]
    for rel in enc["files"]:
        assert crypto.is_encrypted(data / rel), rel
    first = read_jsonl(data / "train.jsonl", limit=3)
    assert first and all("text" in r for r in first)
    assert first[0]["text"][:30].encode() not in (data / "train.jsonl").read_bytes()  # no plaintext on disk
    tokens = load_tokens(data, "train")
    assert isinstance(tokens, encrypted_array.EncryptedArray)
    assert len(tokens) == read_index(data)["splits"]["train"]["tokens"]
    # the same tokens as a plain re-encode of the records
    from homeforge.models.io import load_tokenizer

    assert crypto.is_encrypted(data / "tokenizer" / "tokenizer.json")  # the vocabulary is learned from the data
    assert not crypto.is_encrypted(data / "tokenizer" / "tokenizer_config.json")
    tok = load_tokenizer(data / "tokenizer")
    ids = tok(first[0]["text"])["input_ids"]
    assert not list(Path("/dev/shm").glob("homeforge-tok-*"))  # the decrypted copy is gone
    np.testing.assert_array_equal(np.asarray(tokens[: len(ids)]), ids)
    for rec in read_jsonl(data / "train.jsonl"):
        assert "text" in rec


def test_training_wrote_encrypted_checkpoints_and_model(env):
    from homeforge.models.io import load_causal_lm

    ckpts = sorted((env["run"] / "checkpoints").glob("step-*"))
    assert ckpts
    for name in ("model.safetensors", "trainer.pt", "rng-rank0.pt"):
        assert crypto.is_encrypted(ckpts[-1] / name), name
    model_dir = env["model"]
    manifest = json.loads((model_dir / "homeforge.json").read_text())
    assert "model.safetensors" in manifest["encryption"]["files"]
    assert crypto.is_encrypted(model_dir / "model.safetensors")
    model, tok = load_causal_lm(model_dir)
    # the decrypted weights equal the last checkpoint's, read through the checkpoint readers
    weights = storage.load_safetensors(ckpts[-1] / "model.safetensors")
    params = dict(model.named_parameters())
    assert weights and set(weights) <= set(params) | {"lm_head.weight"}
    for name, value in weights.items():
        if name in params:
            torch.testing.assert_close(params[name], value, msg=name)
    trainer = storage.torch_load(ckpts[-1] / "trainer.pt", map_location="cpu", weights_only=False)
    assert "optimizer" in trainer
    x = torch.tensor([tok("def add(a, b):")["input_ids"]])
    assert torch.isfinite(model(input_ids=x).logits).all()


def test_tampered_or_truncated_model_refused(env, tmp_path):
    import shutil

    from homeforge.data.shards import load_tokens
    from homeforge.models.io import load_causal_lm

    copy = tmp_path / "model"
    shutil.copytree(env["model"], copy)
    w = copy / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    w.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="model.safetensors does not match its recorded hash"):
        load_causal_lm(copy)  # refused by the manifest before decryption
    with pytest.raises(crypto.CryptoError, match="failed authentication"):
        storage.load_safetensors(w)  # and by the cipher itself
    w.write_bytes(bytes(raw[: len(raw) // 3]))
    with pytest.raises(IntegrityError, match="model.safetensors is truncated"):
        load_causal_lm(copy)
    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    b = data / "train.bin"
    b.write_bytes(b.read_bytes()[:-5])
    with pytest.raises(IntegrityError, match="train.bin is truncated"):
        load_tokens(data, "train")
    with pytest.raises(crypto.CryptoError):
        encrypted_array.EncryptedArray(b, "uint16")


def test_wrong_or_missing_key_refused(env, monkeypatch, tmp_path):
    from homeforge.data.shards import load_tokens
    from homeforge.models.io import load_causal_lm

    monkeypatch.setenv("HOMEFORGE_KEY", "ab" * 32)
    with pytest.raises(IntegrityError, match="signed with key") as err:  # the manifest names the other data key first
        load_causal_lm(env["model"])
    assert "use that key" in err.value.render()
    with pytest.raises(crypto.CryptoError, match="encrypted with key"):
        encrypted_array.EncryptedArray(env["data"] / "train.bin", "uint16")
    monkeypatch.delenv("HOMEFORGE_KEY")
    monkeypatch.setenv("HOMEFORGE_HOME", str(tmp_path / "empty"))
    with pytest.raises(keys.KeyError_, match="no data key"):
        load_tokens(env["data"], "val")


def test_verify_and_provenance(env, tmp_path):
    from homeforge.cli import app
    from homeforge.security.provenance import verify_tree

    r = CliRunner().invoke(app, ["verify", str(env["model"])])
    assert r.exit_code == 0, r.output
    checks = verify_tree(env["model"], decrypt=True)
    assert [c.stage for c in checks if c.stage] == ["train", "prepare"]  # model -> dataset, both re-hashed
    assert all(c.ok for c in checks) and "encrypted files authenticated" in checks[0].detail
    assert any("input 'dataset' is the recorded version" in c.detail for c in checks)


def test_rotation_keeps_everything_readable_under_new_key_only(env, tmp_path, monkeypatch):
    import shutil

    from homeforge.cli import app
    from homeforge.data.shards import load_tokens
    from homeforge.models.io import load_causal_lm
    from homeforge.security.provenance import verify_tree

    root = tmp_path / "copy"
    shutil.copytree(env["data"], root / "data")
    shutil.copytree(env["model"], root / "model")
    shutil.copytree(env["run"] / "checkpoints", root / "checkpoints")
    # the model's config points at the original dataset; point it at the copy for provenance
    mf = json.loads((root / "model" / "homeforge.json").read_text())
    mf["config"]["data"] = str(root / "data")
    mf["input_paths"] = {}  # as if made before inputs were located: found through the config
    (root / "model" / "homeforge.json").write_text(json.dumps(integrity.seal(mf)))  # re-signed with the key
    home = tmp_path / "home"
    (home / "keys").mkdir(parents=True)
    shutil.copy2(keys.default_key_file(), home / "keys" / "data.key")
    monkeypatch.setenv("HOMEFORGE_HOME", str(home))
    old = keys.load_key()
    before_tokens = np.asarray(load_tokens(root / "data", "val"))
    before_model, _ = load_causal_lm(root / "model", with_tokenizer=False)

    r = CliRunner().invoke(app, ["keys", "rotate", str(root)])
    assert r.exit_code == 0, r.output
    new = keys.load_key()
    assert new.key_id != old.key_id
    assert not (home / "keys" / "data.key.new").exists()
    assert sorted(f.name for f in (home / "keys").iterdir()) == ["data.key"]  # the old key's copy is destroyed
    assert "overwritten and deleted" in r.output
    for art in ("data", "model"):
        m = json.loads((root / art / "homeforge.json").read_text())
        assert m["encryption"]["key_id"] == new.key_id and m["rotations"][-1]["from_key_id"] == old.key_id
        for rel in m["encryption"]["files"]:
            assert crypto.read_header(root / art / rel)["key_id"] == new.key_id
    np.testing.assert_array_equal(np.asarray(load_tokens(root / "data", "val")), before_tokens)
    after_model, _ = load_causal_lm(root / "model", with_tokenizer=False)
    for a, b in zip(before_model.parameters(), after_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    for ckpt in (root / "checkpoints").glob("step-*"):  # checkpoints (not artifacts) are rotated too
        for name in ("model.safetensors", "trainer.pt", "rng-rank0.pt"):
            assert crypto.read_header(ckpt / name)["key_id"] == new.key_id
        assert storage.load_safetensors(ckpt / "model.safetensors")
    checks = verify_tree(root / "model")
    assert all(c.ok for c in checks), [c.detail for c in checks]
    assert any("input 'dataset' is the recorded version" in c.detail for c in checks)
    monkeypatch.setenv("HOMEFORGE_KEY", old.secret.hex())  # the old key no longer opens anything
    with pytest.raises(crypto.CryptoError, match="encrypted with key"):
        encrypted_array.EncryptedArray(root / "data" / "val.bin", "uint16")
    bad = verify_tree(root / "data", decrypt=True)[0]
    assert not bad.ok and "signed with key" in bad.detail  # and its manifest is signed with the new key


def test_verify_detects_changed_artifact_and_input(env, tmp_path):
    import shutil

    from homeforge.cli import app

    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    model = tmp_path / "model"
    shutil.copytree(env["model"], model)
    mf = json.loads((model / "homeforge.json").read_text())
    mf["config"]["data"] = str(data)
    mf["input_paths"] = {}
    (model / "homeforge.json").write_text(json.dumps(integrity.seal(mf)))  # re-signed by a key holder
    assert CliRunner().invoke(app, ["verify", str(model)]).exit_code == 0
    # a changed dataset (another version in the same place, properly signed)
    dm = json.loads((data / "homeforge.json").read_text())
    (data / "labels.json").write_text("[]")
    from homeforge import _fs, artifacts

    dm["files"]["labels.json"] = _fs.sha256_file(data / "labels.json")
    dm["sizes"]["labels.json"] = 2
    dm["content_hash"] = artifacts.content_hash(dm["files"])
    (data / "homeforge.json").write_text(json.dumps(integrity.seal(dm)))
    r = CliRunner().invoke(app, ["verify", str(model)])
    assert r.exit_code == 1, r.output
    from homeforge.security.provenance import verify_tree

    assert any("has changed since" in c.detail and not c.ok for c in verify_tree(model))
    # one flipped byte in the model itself
    w = model / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[100] ^= 1
    w.write_bytes(bytes(raw))
    r = CliRunner().invoke(app, ["verify", str(model)])
    assert r.exit_code == 1
    assert "does not match its recorded hash" in verify_tree(model)[0].detail


def test_encrypted_lora_adapter_round_trip(env, tmp_path):
    from engine_task import VOCAB

    from homeforge import artifacts
    from homeforge.models.lora import apply_lora, load_adapter, save_adapter
    from homeforge.models.presets import build_model, preset_config

    base = build_model(preset_config("debug", VOCAB, eos_token_id=0), seed=0)
    peft_model = apply_lora(base, r=4, dropout=0.0, seed=0)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    with artifacts.write_artifact(tmp_path / "adapter", stage="test", config={}, encrypt=True) as art:
        save_adapter(peft_model, art.dir)
    assert crypto.is_encrypted(tmp_path / "adapter" / "adapter_model.safetensors")
    loaded = load_adapter(build_model(preset_config("debug", VOCAB, eos_token_id=0), seed=0), tmp_path / "adapter")
    x = torch.randint(0, VOCAB, (1, 16))
    peft_model.eval()
    torch.testing.assert_close(loaded(input_ids=x).logits, peft_model(input_ids=x).logits)


def test_encrypt_true_in_a_stage_config(env, tmp_path):
    """`encrypt: true` in a prepare config (no --encrypt, no env): the dataset is encrypted; the key is
    required as soon as the config is loaded."""
    from rich.console import Console

    from homeforge.config import PrepareConfig, load_config
    from homeforge.data.prepare import run as prepare

    saved = os.environ.pop("HOMEFORGE_ENCRYPT", None)
    try:
        cfg_file = tmp_path / "prepare.yaml"
        cfg_file.write_text("inputs: ['builtin:stdlib-docstrings']\nmax_builtin_chars: 30000\nencrypt: true\n"
                            "tokenizer: {vocab_size: 300}\nworkers: 1\n")
        cfg = load_config(PrepareConfig, cfg_file, [f"output_dir={tmp_path / 'ds'}"])
        out = prepare(cfg, console=Console(quiet=True))["out"]
        enc = json.loads((Path(out) / "homeforge.json").read_text())["encryption"]
        assert "train.bin" in enc["files"] and crypto.is_encrypted(Path(out) / "train.jsonl")
        old_home = os.environ["HOMEFORGE_HOME"]
        os.environ["HOMEFORGE_HOME"] = str(tmp_path / "nokey")
        try:
            cfg2 = load_config(PrepareConfig, cfg_file, [f"output_dir={tmp_path / 'ds2'}"])  # no key loaded here
            with pytest.raises(keys.KeyError_, match="no data key"):  # the stage fails before any work
                prepare(cfg2, console=Console(quiet=True))
        finally:
            os.environ["HOMEFORGE_HOME"] = old_home
        assert not (tmp_path / "ds2").exists()
    finally:
        if saved is not None:
            os.environ["HOMEFORGE_ENCRYPT"] = saved


def test_encrypted_classifier_round_trip(env, tmp_path):
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from homeforge import artifacts

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    with artifacts.write_artifact(tmp_path / "clf", stage="test", config={}, encrypt=True) as art:
        model.save_pretrained(art.dir)
    assert crypto.is_encrypted(tmp_path / "clf" / "model.safetensors")
    from homeforge.models.io import load_classifier

    loaded, _ = load_classifier(tmp_path / "clf", with_tokenizer=False)
    x = torch.randint(1, 64, (2, 7))
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_rotation_with_kms_keys(tmp_path, monkeypatch):
    """Keys from the environment (a KMS): the new key is given in HOMEFORGE_NEW_KEY; nothing is written to a key file."""
    from homeforge import artifacts
    from homeforge.cli import app

    old, new = "11" * 32, "22" * 32
    monkeypatch.setenv("HOMEFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HOMEFORGE_KEY", old)
    with artifacts.write_artifact(tmp_path / "arts" / "a", stage="test", config={}, encrypt=True) as art:
        (art.dir / "records.jsonl").write_text('{"text": "secret"}\n')
    log = crypto.EncryptedLog(tmp_path / "arts" / "feedback.jsonl")
    log.append('{"rating": 5}')
    r = CliRunner().invoke(app, ["keys", "rotate", str(tmp_path / "arts")])
    assert r.exit_code != 0 and "HOMEFORGE_NEW_KEY" in str(r.exception)  # (CliRunner bypasses main())
    monkeypatch.setenv("HOMEFORGE_NEW_KEY", new)
    r = CliRunner().invoke(app, ["keys", "rotate", str(tmp_path / "arts")])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "home" / "keys").exists()
    monkeypatch.setenv("HOMEFORGE_KEY", new)
    assert crypto.read_bytes(tmp_path / "arts" / "a" / "records.jsonl") == b'{"text": "secret"}\n'
    assert crypto.read_bytes(tmp_path / "arts" / "feedback.jsonl") == b'{"rating": 5}\n'
    artifacts.verify(tmp_path / "arts" / "a", deep=True)
    monkeypatch.setenv("HOMEFORGE_KEY", old)
    with pytest.raises(crypto.CryptoError, match="encrypted with key"):
        crypto.read_bytes(tmp_path / "arts" / "a" / "records.jsonl")


def test_compress_an_encrypted_model_to_an_encrypted_int8_model(env, tmp_path):
    """compress reads the encrypted model and dataset and writes an encrypted int8 model that loads."""
    from rich.console import Console

    from homeforge.compress import run as compress
    from homeforge.config import CompressConfig, load_config
    from homeforge.models.io import load_causal_lm

    cfg = load_config(CompressConfig, overrides=["method=int8-weight-only", "max_examples=4", "latency_repeats=1",
                                                 "latency_seq_len=16", "context=32"])
    out = tmp_path / "int8"
    compress.run(env["model"], env["data"], cfg, out, False, Console(quiet=True))
    assert crypto.is_encrypted(out / "model.safetensors")
    header = storage.safetensors_header(out / "model.safetensors")
    assert any(k.endswith(".qweight") for k in header) or any(v[0] == "I8" for v in header.values())
    model, tok = load_causal_lm(out)
    x = torch.tensor([tok("def f(x):")["input_ids"]])
    assert torch.isfinite(model(input_ids=x).logits).all()


def test_resume_from_an_encrypted_checkpoint(env, tmp_path):
    """The engine resumes from encrypted checkpoints (load_checkpoint: weights, optimizer, RNG) exactly."""
    from engine_task import make_cfg, make_task

    from homeforge.train.checkpoint import resolve_resume
    from homeforge.train.loop import train_task

    over = ["max_steps=6", "checkpoint.every=3", "eval_every=100"]
    cfg = make_cfg(tmp_path / "run", *over)
    full = train_task(make_task(cfg), cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    assert crypto.is_encrypted(ckpt / "trainer.pt") and crypto.is_encrypted(ckpt / "model.safetensors")
    cfg2 = make_cfg(tmp_path / "run", *over)
    resumed = train_task(make_task(cfg2), cfg2, tmp_path / "run", resume=resolve_resume(tmp_path / "run", str(ckpt)))
    assert [r["loss"] for r in resumed.history if r["step"] > 3] == pytest.approx(
        [r["loss"] for r in full.history if r["step"] > 3], rel=1e-6)


def test_token_records_reader(env, tmp_path):
    """read_token_records (SFT / classification datasets) reads an encrypted tokens.jsonl."""
    from homeforge.train.methods.common import Dataset, read_token_records

    recs = [{"input_ids": [1, 2, 3], "label": i % 2} for i in range(50)]
    crypto.write_encrypted(tmp_path / "train.tokens.jsonl", "".join(json.dumps(r) + "\n" for r in recs).encode())
    ds = Dataset(root=tmp_path, index={"splits": {"train": {}}}, kind="classification", tokenizer=None)
    assert read_token_records(ds, "train", ("input_ids", "label")) == recs

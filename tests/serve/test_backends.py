"""ONNX Runtime backend (on `homeforge export --format onnx` output) and the vLLM message."""

from __future__ import annotations

import httpx
import pytest
import torch

from homeforge.errors import HomeforgeError

from .conftest import running_server
from .test_engine import PROMPTS, run


@pytest.fixture(scope="module")
def onnx_dir(tiny_model_dir, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from homeforge.config import ExportConfig, load_config
    from homeforge.export import run_export

    out = tmp_path_factory.mktemp("onnx") / "tiny-onnx"
    return run_export(tiny_model_dir, out, load_config(ExportConfig, None, ["format=onnx"]))


def test_onnx_engine_batches_like_torch(onnx_dir, tiny_model_dir):
    from homeforge.models.io import load_causal_lm
    from homeforge.serve.backends import OnnxBackend
    from homeforge.serve.engine import Engine, TorchBackend

    torch.set_num_threads(1)
    model, tok = load_causal_lm(tiny_model_dir)
    te = Engine(TorchBackend(model), tok).start()
    oe = Engine(OnnxBackend(onnx_dir, threads=1), tok, max_batch_size=4).start()
    try:
        ref = [run(te, tok, [p])[0].ids for p in PROMPTS]
        together = [c.ids for c in run(oe, tok, PROMPTS)]
        assert oe.max_batch_seen == 4
    finally:
        te.shutdown()
        oe.shutdown()
    assert together == ref


def test_onnx_server(onnx_dir, tmp_path):
    from homeforge.config import ServeConfig

    cfg = ServeConfig(model_dir=str(onnx_dir), backend="onnx", keys_file=str(tmp_path / "k.json"))
    with running_server(cfg) as (base, state):
        r = httpx.post(base + "/v1/completions", json={"prompt": "def", "max_tokens": 5, "temperature": 0,
                                                        "echo": True, "logprobs": 1}, timeout=60)
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) >= 2
        r = httpx.post(base + "/v1/embeddings", json={"input": "x"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_backend"
    with pytest.raises(HomeforgeError, match="model.int9.onnx does not exist"):
        from homeforge.serve.app import load_model

        load_model(cfg.model_copy(update={"onnx_file": "model.int9.onnx"}))


def test_vllm_missing_gives_clear_message(tiny_model_dir):
    from homeforge.config import ServeConfig
    from homeforge.serve.app import load_model

    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    with pytest.raises(HomeforgeError, match="needs the `vllm` package"):
        load_model(ServeConfig(model_dir=str(tiny_model_dir), backend="vllm"))

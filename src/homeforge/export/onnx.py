"""`--format onnx`: a decoder logits graph for ONNX Runtime, with KV-cache inputs and outputs.

Exported with ``torch.onnx.export(..., dynamo=True)`` (the TorchScript exporter fails on
transformers 5 decoders). With ``onnx.kv_cache`` (default) the graph is the one a
generation loop needs, in the layout optimum and onnxruntime-genai use:

    inputs   input_ids [batch, seq]  attention_mask [batch, past+seq]  position_ids [batch, seq]
             past_key_values.{i}.key / .value [batch, heads, past, dim]   (past may be 0)
    outputs  logits [batch, seq, vocab]  present.{i}.key / .value [batch, heads, past+seq, dim]

(``heads, dim``: what the model caches, see ``cache_shapes``; mixture-of-experts models are
exported with static-shape experts, see ``_static_experts``.)

Without it: ``input_ids``, ``attention_mask`` -> ``logits``. The graph is then optimised by
ONNX Runtime (offline, the optimised graph is what is saved), and optionally quantized to
int8 into ``model.int8.onnx`` (``onnx.int8_scheme``):

* ``blockwise`` (default): ONNX Runtime's ``MatMulNBits`` with 8-bit symmetric weights, one
  scale per ``onnx.int8_block_size`` inputs, and int8 dot products on activations quantized
  per block at run time (``accuracy_level=4``), the scheme of llama.cpp's q8_0. A block
  scale follows the activation outliers of LLMs locally, where one per-tensor scale cannot.
* ``dynamic``: ``quantize_dynamic``, per-channel int8 weights and one activation scale per
  tensor per call (``MatMulInteger``). On SmolLM2-135M it loses the model (top-1 agreement
  with fp32 0.86, perplexity +6.4% with the down projections kept fp32).

The modules named in ``onnx.int8_exclude`` stay fp32 (default: the MLP down projections,
whose inputs carry the largest outliers, and the output head). On SmolLM2-135M
(benchmarks/RESULTS.md) blockwise gives top-1 agreement 0.971 and perplexity +0.22% with them
fp32, 0.964 with the head int8 too, 0.961 with everything int8.

Parity: logits of the parity texts in onnxruntime vs PyTorch; with a KV cache also a
prefill + token-by-token decode whose logits must match PyTorch's full-sequence logits.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from homeforge.errors import HomeforgeError
from homeforge.export import common

LARGE = 1_500_000_000  # bytes of weights above which initializers go to an external data file


def cache_shapes(model) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per layer, the (heads, dim) of the cached keys and of the cached values.

    Read from one forward pass rather than computed from the config: most decoders cache
    ``[kv_heads, head_dim]`` for both, but DeepSeek-V3 (MLA) caches its compressed latent
    (``[1, kv_lora_rank]``) as keys and the shared rotary key (``[1, qk_rope_head_dim]``) as
    values, and other architectures have their own layouts.
    """
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    return [((int(layer.keys.shape[1]), int(layer.keys.shape[-1])), (int(layer.values.shape[1]), int(layer.values.shape[-1])))
            for layer in out.past_key_values.layers]


def past_shapes(sess) -> dict[str, tuple[int, int]]:
    """``past_key_values.*`` input name -> (heads, dim), read from an ONNX Runtime session's inputs."""
    return {i.name: (int(i.shape[1]), int(i.shape[3])) for i in sess.get_inputs()
            if i.name.startswith("past_key_values.")}


def _wrapper(model, kv_cache: bool):
    import torch
    from transformers import DynamicCache

    n_layers = model.config.num_hidden_layers

    class WithCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.m.config)
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            flat = []
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    class NoCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return (WithCache if kv_cache else NoCache)(model).eval()


def io_names(config, kv_cache: bool) -> tuple[list[str], list[str]]:
    n_layers = config.num_hidden_layers
    ins = ["input_ids", "attention_mask"]
    outs = ["logits"]
    if kv_cache:
        ins.append("position_ids")
        ins += [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
        outs += [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ins, outs


def _static_experts(model) -> str | None:
    """Switch a mixture-of-experts model to transformers' ``batched_mm`` experts; return the old setting.

    The default (``grouped_mm``/eager) experts sort tokens by expert and loop over the experts
    that received any: shapes that depend on the data, which the dynamo exporter cannot
    convert. ``batched_mm`` gathers each token's top-k expert weights and multiplies them
    with one batched matmul: the same arithmetic with static shapes (``Gather`` + ``MatMul``
    in the graph), so every expert stays in the ONNX file and routing happens at run time.
    """
    if not getattr(model, "_can_set_experts_implementation", lambda: False)():
        return None
    old = model.config._experts_implementation
    model.set_experts_implementation("batched_mm")
    return old


def _export_raw(model, path: Path, shapes_kv: list | None, opset: int) -> None:
    """The raw dynamo graph; ``shapes_kv`` (``cache_shapes``) adds the KV-cache inputs, None a plain logits graph."""
    import torch
    from torch.export import Dim

    kv_cache = shapes_kv is not None
    batch, seq, past, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    b, t, p = 2, 5, 3  # example sizes; every one of them is dynamic in the graph
    ids = torch.zeros(b, t, dtype=torch.long)
    ins, outs = io_names(model.config, kv_cache)
    if kv_cache:
        mask = torch.ones(b, p + t, dtype=torch.long)
        pos = torch.arange(p, p + t).expand(b, t).contiguous()
        pasts = tuple(torch.zeros(b, h, p, d) for layer in shapes_kv for h, d in layer)
        args = (ids, mask, pos, *pasts)
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                  "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past} for _ in pasts)}
    else:
        mask = torch.ones(b, t, dtype=torch.long)
        args = (ids, mask)
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    experts = _static_experts(model)
    try:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(_wrapper(model, kv_cache), args, dynamo=True, input_names=ins, output_names=outs,
                                     dynamic_shapes=shapes, opset_version=opset, optimize=True, verbose=False)
    except Exception as exc:  # torch.export / onnxscript raise many kinds
        raise HomeforgeError(
            f"torch.onnx.export failed for this {model.config.model_type} model: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]}",
            fix="try onnx.kv_cache=false (a plain logits graph), or export with --format hf",
        ) from None
    finally:
        if experts is not None:
            model.set_experts_implementation(experts)
    prog.save(str(path), external_data=size > LARGE)


def nodes_of_modules(path: Path, patterns: list[str]) -> list[str]:
    """Names of the MatMul nodes exported from modules whose name contains one of ``patterns``.

    The dynamo exporter records each node's module path in ``pkg.torch.onnx.name_scopes``.
    """
    import onnx

    if not patterns:
        return []
    model = onnx.load(str(path), load_external_data=False)
    out = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        if any(pat in scopes for pat in patterns):
            out.append(node.name)
    return out


def _quantize_int8(src: Path, dst: Path, oc, excluded: list[str]) -> None:
    """int8 weights for every MatMul of the fp32 graph ``src`` except the ``excluded`` nodes."""
    import logging

    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # ORT's quantizers log every node (INFO) and generic hints on the root logger
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    quiet_level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        if oc.int8_scheme == "blockwise":
            from onnxruntime.quantization.matmul_nbits_quantizer import (
                DefaultWeightOnlyQuantConfig,
                MatMulNBitsQuantizer,
            )

            # accuracy_level 4: int8 x int8 dot products, activations quantized per block at run time
            algo = DefaultWeightOnlyQuantConfig(block_size=oc.int8_block_size, is_symmetric=True, accuracy_level=4,
                                                bits=8)
            q = MatMulNBitsQuantizer(str(src), bits=8, block_size=oc.int8_block_size, is_symmetric=True,
                                     accuracy_level=4, nodes_to_exclude=excluded, algo_config=algo)
            q.process()
            q.model.save_model_to_file(str(dst), use_external_data_format=src.stat().st_size > LARGE)
        else:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=excluded,
                             use_external_data_format=src.stat().st_size > LARGE)
    finally:
        root.setLevel(level)
        quiet.setLevel(quiet_level)


def _ort_optimize(src: Path, dst: Path, level: str) -> None:
    import onnxruntime as ort

    if level == "none":
        import onnx

        model = onnx.load(str(src))
        onnx.save(model, str(dst), save_as_external_data=src.stat().st_size > LARGE)
        return
    so = ort.SessionOptions()
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    so.optimized_model_filepath = str(dst)
    if src.stat().st_size > LARGE or any(src.parent.glob("*.data")):
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


def session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    from homeforge import integrity

    integrity.check_now(path)  # an exported graph is checked against its artifact's manifest before use

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimised offline
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _empty_past(sess, batch: int) -> dict:
    return {name: np.zeros((batch, h, 0, d), np.float32) for name, (h, d) in past_shapes(sess).items()}


def ort_logits(sess, config, ids_list: list[list[int]], kv_cache: bool) -> list[np.ndarray]:
    """Full-sequence logits [T, V] of each sequence in onnxruntime (batch 1, empty cache)."""
    out = []
    for ids in ids_list:
        x = np.array([ids], dtype=np.int64)
        feed = {"input_ids": x, "attention_mask": np.ones_like(x), **_empty_past(sess, 1)}
        if kv_cache:
            feed["position_ids"] = np.arange(x.shape[1], dtype=np.int64)[None]
        out.append(sess.run(["logits"], feed)[0][0])
    return out


def ort_decode_logits(sess, config, ids: list[int], prefill: int) -> np.ndarray:
    """Logits [T, V]: a prefill of ``prefill`` tokens, then one token per step through the cache."""
    ins, outs = io_names(config, True)
    past = _empty_past(sess, 1)
    rows = []
    pos = 0
    steps = [ids[:prefill]] + [[t] for t in ids[prefill:]]
    for chunk in steps:
        x = np.array([chunk], dtype=np.int64)
        feed = {"input_ids": x, "attention_mask": np.ones((1, pos + len(chunk)), np.int64),
                "position_ids": np.arange(pos, pos + len(chunk), dtype=np.int64)[None], **past}
        res = sess.run(outs, feed)
        rows.append(res[0][0])
        past = {name.replace("present", "past_key_values"): v for name, v in zip(outs[1:], res[1:], strict=True)}
        pos += len(chunk)
    return np.concatenate(rows, axis=0)


def _parity(sess, src: common.Source, ids, ref, kv_cache: bool, tol: float, min_top1: float) -> dict:
    config = src.model.config
    result = common.compare(ref, ort_logits(sess, config, ids, kv_cache), tol, min_top1)
    if kv_cache:
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        seq = ids[longest]
        if len(seq) >= 2:
            prefill = max(1, len(seq) // 2)
            dec = common.compare([ref[longest]], [ort_decode_logits(sess, config, seq, prefill)], tol, min_top1)
            result["kv_decode"] = {k: dec[k] for k in ("max_rel_error", "top1_agreement", "passed")}
            result["kv_decode"]["prefill"], result["kv_decode"]["decode_steps"] = prefill, len(seq) - prefill
            result["passed"] = result["passed"] and dec["passed"]
            result["max_rel_error"] = max(result["max_rel_error"], dec["max_rel_error"])
    return result


def export_onnx(src: common.Source, out: Path, cfg, console=None) -> dict:
    """Write ``model.onnx`` (+ ``model.int8.onnx``), tokenizer and config into ``out``; check parity."""
    import torch

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise HomeforgeError("ONNX export needs onnx, onnxscript and onnxruntime",
                             fix="pip install 'homeforge[export]'") from None
    oc = cfg.onnx
    model = src.model.float().eval()
    ids = common.parity_ids(src.tokenizer, cfg.parity.texts)
    ref = common.torch_logits(src.reference, ids)
    metrics: dict = {}
    per_layer = cache_shapes(model) if oc.kv_cache else None
    with tempfile.TemporaryDirectory(prefix=".onnx-raw-", dir=out.parent) as scratch:
        raw = Path(scratch) / "raw.onnx"
        _export_raw(model, raw, per_layer, oc.opset)
        _ort_optimize(raw, out / "model.onnx", oc.optimize)
        res = _parity(session(out / "model.onnx"), src, ids, ref, oc.kv_cache,
                      common.tolerance_for("float32", cfg.parity.max_rel_error), cfg.parity.min_top1_agreement)
        common.check(res, "the ONNX export (fp32)", out / "model.onnx")
        metrics["parity"] = res
        if oc.int8:
            excluded = nodes_of_modules(raw, oc.int8_exclude)
            q_raw = Path(scratch) / "raw.int8.onnx"
            _quantize_int8(out / "model.onnx", q_raw, oc, excluded)
            _ort_optimize(q_raw, out / "model.int8.onnx", oc.optimize)
            q_tol = cfg.parity.max_rel_error if cfg.parity.max_rel_error is not None else common.TOLERANCES["int8"]
            res8 = _parity(session(out / "model.int8.onnx"), src, ids, ref, oc.kv_cache, q_tol,
                           cfg.parity.min_top1_agreement)
            common.check(res8, "the ONNX int8 export", out / "model.int8.onnx")
            res8["fp32_nodes"] = len(excluded)
            res8["scheme"] = oc.int8_scheme
            if oc.int8_scheme == "blockwise":
                res8["block_size"] = oc.int8_block_size
            metrics["parity_int8"] = res8
    src.tokenizer.save_pretrained(str(out))
    src.model.config.save_pretrained(str(out))
    if getattr(src.model, "generation_config", None) is not None:
        src.model.generation_config.save_pretrained(str(out))
    ins, outs = io_names(model.config, oc.kv_cache)
    sizes = {p.name: p.stat().st_size for p in out.glob("*.onnx*")}
    metrics["onnx"] = {"kv_cache": oc.kv_cache, "opset": oc.opset, "optimize": oc.optimize, "inputs": ins,
                       "outputs": outs, "num_layers": model.config.num_hidden_layers,
                       "past_key_shape": list(per_layer[0][0]) if per_layer else None,
                       "past_value_shape": list(per_layer[0][1]) if per_layer else None,
                       "bytes": sizes, "torch_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                       "torch_version": torch.__version__}
    return metrics


def ort_greedy(sess, config, ids: list[int], max_new_tokens: int, eos_id: int | list[int] | None = None,
               min_new_tokens: int = 0) -> list[int]:
    """Greedy generation with an exported KV-cache graph (batch 1): the new token ids.

    Stops after an ``eos_id`` token; before ``min_new_tokens`` tokens the eos ids are never
    chosen (as ``min_new_tokens`` in transformers' ``generate``).
    """
    eos = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    ins, outs = io_names(config, True)
    past = _empty_past(sess, 1)
    chunk, pos, new = list(ids), 0, []
    for _ in range(max_new_tokens):
        x = np.array([chunk], dtype=np.int64)
        feed = {"input_ids": x, "attention_mask": np.ones((1, pos + len(chunk)), np.int64),
                "position_ids": np.arange(pos, pos + len(chunk), dtype=np.int64)[None], **past}
        res = sess.run(outs, feed)
        logits = res[0][0, -1]
        if eos and len(new) < min_new_tokens:
            logits = logits.copy()
            logits[eos] = -np.inf
        nxt = int(logits.argmax())
        new.append(nxt)
        if nxt in eos:
            break
        past = {name.replace("present", "past_key_values"): v for name, v in zip(outs[1:], res[1:], strict=True)}
        pos += len(chunk)
        chunk = [nxt]
    return new

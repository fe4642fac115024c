"""Serving backends besides PyTorch: ONNX Runtime for `homeforge export --format onnx` output.

The ONNX graph (see ``homeforge.export.onnx``) takes ``input_ids``, ``attention_mask``,
``position_ids`` and ``past_key_values.{i}.key/value`` and returns ``logits`` and
``present.{i}.key/value``: exactly what the engine's continuous batching needs, so the
same engine drives it. The KV cache lives as torch tensors that share memory with numpy
(no copies on the way in or out).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from homeforge.errors import HomeforgeError
from homeforge.serve.engine import Backend


class _Layer:
    __slots__ = ("keys", "values")

    def __init__(self, keys, values):
        self.keys, self.values = keys, values


class ListCache:
    """A minimal KV cache: ``layers[i].keys/values`` as [batch, kv_heads, seq, head_dim] tensors."""

    def __init__(self, layers: list[_Layer]):
        self.layers = layers

    def get_seq_length(self) -> int:
        return int(self.layers[0].keys.shape[-2]) if self.layers else 0


class OnnxBackend(Backend):
    def __init__(self, model_dir: str | Path, onnx_file: str = "model.onnx", threads: int | None = None):
        from transformers import AutoConfig

        d = Path(model_dir)
        path = d / onnx_file
        if not path.is_file():
            found = sorted(p.name for p in d.glob("*.onnx"))
            raise HomeforgeError(f"{path} does not exist" + (f" (found: {', '.join(found)})" if found else ""),
                                 where=str(d), fix="export the model first: `homeforge export MODEL --format onnx`"
                                                   + (f", or pass onnx_file={found[0]}" if found else ""))
        from homeforge.export.onnx import io_names, past_shapes, session

        self.config = AutoConfig.from_pretrained(str(d), local_files_only=True)
        self.sess = session(path, threads)
        names = {i.name for i in self.sess.get_inputs()}
        if "position_ids" not in names:
            raise HomeforgeError(f"{path} was exported without a KV cache; serving needs one",
                                 where=str(path), fix="re-export with onnx.kv_cache=true (the default)")
        self.ins, self.outs = io_names(self.config, True)
        shapes = past_shapes(self.sess)  # (heads, dim) of every past input, as the graph declares them
        self.n_layers = len(shapes) // 2
        self.past = [(shapes[f"past_key_values.{i}.key"], shapes[f"past_key_values.{i}.value"])
                     for i in range(self.n_layers)]
        self.max_context = int(getattr(self.config, "max_position_embeddings", 2048) or 2048)
        self.vocab_size = int(self.config.vocab_size)
        self.path = path

    def new_cache(self) -> ListCache:
        return ListCache([_Layer(torch.zeros(1, kh, 0, kd), torch.zeros(1, vh, 0, vd))
                          for (kh, kd), (vh, vd) in self.past])

    def forward(self, input_ids, position_ids, attention_mask, cache: ListCache, last_only: bool = False):
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                "position_ids": position_ids.numpy()}
        b = input_ids.shape[0]
        for i, layer in enumerate(cache.layers):
            k, v = layer.keys, layer.values
            if k.shape[0] != b:  # a fresh cache is made for batch 1; widen its empty tensors
                (kh, kd), (vh, vd) = self.past[i]
                k, v = torch.zeros(b, kh, 0, kd), torch.zeros(b, vh, 0, vd)
            feed[f"past_key_values.{i}.key"] = np.ascontiguousarray(k.numpy())
            feed[f"past_key_values.{i}.value"] = np.ascontiguousarray(v.numpy())
        res = self.sess.run(self.outs, feed)
        layers = [_Layer(torch.from_numpy(res[1 + 2 * i]), torch.from_numpy(res[2 + 2 * i]))
                  for i in range(self.n_layers)]
        return torch.from_numpy(res[0]).float(), ListCache(layers)

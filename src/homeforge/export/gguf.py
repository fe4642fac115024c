"""`--format gguf`: a GGUF file for llama.cpp and Ollama, written with the `gguf` package.

Pure numpy: no compiler, no llama.cpp checkout, no network. Supported: Llama-architecture
models (every built-in preset, Llama/SmolLM/Mistral-style checkpoints), Qwen2, and the MoE
models Qwen2-MoE (llama.cpp's ``qwen2moe``) and DeepSeek-V3 (``deepseek2``, MLA), with a
byte-level BPE tokenizer. Weights go out as f32, f16 or q8_0 (norms, biases and MoE routers
stay f32, as llama.cpp's converter keeps them; a matrix whose rows are not a multiple of 32
falls back to f16 under q8_0). The per-architecture keys and tensor layouts are in
``gguf_arch.py``; every file is what llama.cpp's own ``convert_hf_to_gguf.py`` writes for the
same model (tests/export/test_llamacpp_oracle.py compares them key by key, byte by byte).

The tokenizer goes in as ``tokenizer.ggml.*`` metadata (model ``gpt2``, merges, token
types: special added tokens are CONTROL) with the chat template; its pre-tokenizer name is
chosen as llama.cpp's converter chooses it (``pre_tokenizer``). Parity: the file is read
back with ``GGUFReader`` (every tensor's name, shape and type, the metadata), then loaded
with transformers' GGUF loader (which dequantizes; for the MoE architectures, which it cannot
load, the dequantized tensors are mapped back into the model: ``gguf_arch.from_gguf_state``)
and its logits and tokenizer compared with the original's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from homeforge.errors import HomeforgeError
from homeforge.export import common, gguf_arch
from homeforge.export.gguf_arch import SUPPORTED

# a tokenizer llama.cpp's converter does not know by its hash (pretok.KNOWN) is named by what its
# pre-tokenizer does: the Split regex of Qwen2 / Llama 3, GPT-2's ByteLevel regex (every
# tokenizer `homeforge prepare` trains: data/tokenizer.py), SmolLM's single digits before it
_PRE_BY_REGEX: dict[str, str] = {}


def _pre_names() -> dict[str, str]:
    from homeforge.export import pretok

    if not _PRE_BY_REGEX:
        _PRE_BY_REGEX.update({pretok.qwen2_regex(): "qwen2", pretok.LLAMA3_REGEX: "llama-bpe"})
    return _PRE_BY_REGEX


# --------------------------------------------------------------------------- checks


def check_supported(config, tokenizer) -> None:
    """Raise a clear HomeforgeError if this model or tokenizer cannot go to GGUF."""
    arch = getattr(config, "model_type", None)
    supported = "; ".join(f"{k}: {v}" for k, v in SUPPORTED.items())
    if arch not in SUPPORTED:
        raise HomeforgeError(
            f"GGUF export does not support the architecture {arch!r} ({(config.architectures or ['?'])[0]})",
            fix=f"supported architectures are {supported}; export this model with --format hf or --format onnx",
        )
    problems = gguf_arch.problems(config)
    try:
        pre_tokenizer(tokenizer)
    except HomeforgeError as exc:
        problems.append(exc.what)
    if problems:
        raise HomeforgeError(
            f"this {arch} model cannot be exported to GGUF: " + "; ".join(problems),
            fix=f"GGUF export supports {supported} with a byte-level BPE tokenizer; use --format hf or onnx instead",
        )


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise HomeforgeError("the tokenizer is not a fast (tokenizers) tokenizer",
                             fix="save the tokenizer as tokenizer.json (PreTrainedTokenizerFast)")
    return json.loads(backend.to_str())


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer (``tokenizer.ggml.pre``).

    First the way llama.cpp's converter chooses it (the hash of the tokenizer's encoding of a
    fixed text, looked up in the converter's table: pretok.py); for a tokenizer it does not
    know, by the pre-tokenizer's definition: GPT-2's byte-level regex -> ``gpt-2``, single
    digits then GPT-2's regex -> ``smollm``, Qwen2's / Llama 3's split regex -> ``qwen2`` /
    ``llama-bpe``. Anything else is refused rather than written with a name that would make
    llama.cpp split the text differently.
    """
    from homeforge.export import pretok

    tj = _tokenizer_json(tokenizer)
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise HomeforgeError(f"the tokenizer is {model.get('type')!r}{' with byte fallback' if model.get('byte_fallback') else ''}, "
                             "not a byte-level BPE")
    if name := pretok.known_name(tokenizer):
        return name
    pre = tj.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in items]
    if kinds[-1:] == ["ByteLevel"] and items[-1].get("use_regex", True) and not items[-1].get("add_prefix_space"):
        if len(kinds) == 1:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits"):
            return "smollm"
    if kinds == ["Split", "ByteLevel"] and not items[1].get("use_regex", True):
        regex = items[0].get("pattern", {}).get("Regex")
        name = _pre_names().get(regex)
        if name:
            return name
    raise HomeforgeError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) is not one llama.cpp knows "
                         "(GPT-2, SmolLM, Qwen2 or Llama-3 byte-level BPE, or a tokenizer llama.cpp's converter "
                         "recognises)")


# --------------------------------------------------------------------------- tokenizer

# the special tokens whose ids llama.cpp's converter writes (gguf.SpecialVocab; "cls" has no GGUF key)
SPECIAL_IDS = ("bos", "eos", "unk", "sep", "pad", "mask")


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict[str, Any]:
    """``tokenizer.ggml.*`` fields for a byte-level BPE tokenizer (llama.cpp's ``gpt2`` model)."""
    import gguf

    tj = _tokenizer_json(tokenizer)
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    types: dict[int, int] = {}
    for added in tj.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    token_types = [int(gguf.TokenType.UNUSED)] * n
    for text, idx in vocab.items():
        tokens[idx] = text
        token_types[idx] = int(types.get(idx, gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in SPECIAL_IDS}
    return {"model": "gpt2", "pre": pre_tokenizer(tokenizer), "tokens": tokens, "token_types": token_types,
            "merges": merges, "ids": ids, "chat_template": common.chat_template(tokenizer),
            "add_bos": bool(getattr(tokenizer, "add_bos_token", False)),
            "add_eos": bool(getattr(tokenizer, "add_eos_token", False))}


# --------------------------------------------------------------------------- tensors


def _quantize(gname: str, arr: np.ndarray, outtype: str):
    """(data in the file's dtype, GGML type) as the converter picks it; q8_0 falls back to f16 when rows do not fit."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if arr.ndim <= 1 or outtype == "f32" or gguf_arch.force_f32(gname):
        return arr.astype(np.float32), Q.F32
    if outtype == "q8_0":
        try:
            return gguf.quants.quantize(arr, Q.Q8_0), Q.Q8_0
        except gguf.QuantError:
            pass
    return arr.astype(np.float16), Q.F16


def gguf_tensors(model, outtype: str):
    """Yield (gguf name, HF name, data in the file's dtype, GGML type, fp32 shape) for every weight."""
    import gguf

    config = model.config
    arch = gguf.MODEL_ARCH[gguf_arch.GGUF_ARCH[config.model_type].upper()]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for map_name, hf_name, arr in gguf_arch.hf_tensors(model):
        base, _, suffix = map_name.rpartition(".")
        name = names.get_name(base)
        if name is None:
            raise HomeforgeError(f"no GGUF name for the tensor {hf_name!r}",
                                 fix="this checkpoint has weights llama.cpp's architecture does not know")
        gname = f"{name}.{suffix}"
        data, qtype = _quantize(gname, arr, outtype)
        yield gname, hf_name, data, qtype, arr.shape


def write_gguf(model, tokenizer, path: Path, outtype: str, name: str, progress=None) -> dict:
    """Write ``model`` and ``tokenizer`` to the GGUF file ``path``; return what was written."""
    import gguf

    from homeforge import __version__

    config = model.config
    w = gguf.GGUFWriter(str(path), gguf_arch.GGUF_ARCH[config.model_type], use_temp_file=False)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_string("general.source.homeforge_version", __version__)
    gguf_arch.write_hparams(w, config)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tm = tokenizer_metadata(tokenizer, int(config.vocab_size))
    w.add_tokenizer_model(tm["model"])
    w.add_tokenizer_pre(tm["pre"])
    w.add_token_list(tm["tokens"])
    w.add_token_types(tm["token_types"])
    w.add_token_merges(tm["merges"])
    for key, token_id in tm["ids"].items():  # tokenizer.ggml.{bos,eos,unknown,...}_token_id, as the converter
        if token_id is not None:
            getattr(w, f"add_{key}_token_id")(int(token_id))
    w.add_add_bos_token(tm["add_bos"])
    w.add_add_eos_token(tm["add_eos"])
    if tm["chat_template"]:
        w.add_chat_template(tm["chat_template"])

    written: dict[str, dict] = {}
    n = len(model.state_dict())
    task = progress.add_task(f"writing {path.name}", total=n) if progress is not None else None
    for gname, hf_name, data, qtype, shape in gguf_tensors(model, outtype):
        w.add_tensor(gname, data, raw_dtype=qtype)  # quantized rows: uint8 bytes, shape derived
        written[gname] = {"hf_name": hf_name, "shape": list(shape), "type": qtype.name}
        if task is not None and hf_name != written.get("_last"):
            progress.advance(task)
        written["_last"] = hf_name
    written.pop("_last", None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensors": written, "n_tokens": len(tm["tokens"]), "pre": tm["pre"],
            "chat_template": tm["chat_template"], "ids": tm["ids"]}


# --------------------------------------------------------------------------- read back


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    return f.contents()


def read_back(path: Path, written: dict, config) -> dict:
    """Check the file with GGUFReader: every tensor (name, shape, type) and the key metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    problems = []
    got = {t.name: t for t in reader.tensors}
    if set(got) != set(written["tensors"]):
        problems.append(f"tensor names differ: missing {sorted(set(written['tensors']) - set(got))}, "
                        f"extra {sorted(set(got) - set(written['tensors']))}")
    for name, info in written["tensors"].items():
        t = got.get(name)
        if t is None:
            continue
        shape = list(reversed([int(x) for x in t.shape]))  # GGUF lists dims fastest-first
        if shape != info["shape"] or t.tensor_type.name != info["type"]:
            problems.append(f"{name}: {shape} {t.tensor_type.name}, expected {info['shape']} {info['type']}")
    arch = gguf_arch.GGUF_ARCH[config.model_type]
    expect = {
        "general.architecture": arch,
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.num_attention_heads,
        f"{arch}.attention.head_count_kv": 1 if arch == "deepseek2" else config.num_key_value_heads,
        f"{arch}.context_length": config.max_position_embeddings,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": written["pre"],
    }
    if written["chat_template"]:
        expect["tokenizer.chat_template"] = written["chat_template"]
    for key, value in expect.items():
        if _field(reader, key) != value:
            problems.append(f"metadata {key} = {_field(reader, key)!r}, expected {value!r}")
    n_tokens = len(_field(reader, "tokenizer.ggml.tokens") or [])
    if n_tokens != written["n_tokens"]:
        problems.append(f"{n_tokens} tokens in the file, expected {written['n_tokens']}")
    return {"tensors": len(got), "metadata_keys": len(reader.fields), "problems": problems, "passed": not problems}


def load_back(path: Path, written: dict, model):
    """A copy of ``model`` holding the file's weights (dequantized, llama.cpp's layout undone)."""
    import copy

    import gguf
    import torch
    from gguf import GGUFReader

    arrays = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
              .reshape(written["tensors"][t.name]["shape"]) for t in GGUFReader(str(path)).tensors}
    hf_names = {g: info["hf_name"] for g, info in written["tensors"].items()}
    state = gguf_arch.from_gguf_state(arrays, hf_names, model.config)
    loaded = copy.deepcopy(model)
    missing, unexpected = loaded.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise common.ParityError(f"the GGUF file's tensors do not map back onto the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}", where=str(path), fix="report this model")
    return loaded.eval()


# --------------------------------------------------------------------------- export


def export_gguf(src: common.Source, out: Path, cfg, console=None) -> dict:
    """Write ``model-<outtype>.gguf`` (+ Modelfile) into ``out`` and check parity."""
    import torch
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    from homeforge.export.modelfile import write_modelfile
    from homeforge.models.io import quiet_transformers

    check_supported(src.model.config, src.tokenizer)
    outtype = cfg.gguf.outtype
    filename = f"model-{outtype}.gguf"
    path = out / filename
    name = cfg.gguf.name or src.path.name
    with Progress(console=console, transient=True, disable=console is None or console.quiet) as progress:
        written = write_gguf(src.model, src.tokenizer, path, outtype, name, progress=progress)
    readback = read_back(path, written, src.model.config)
    if not readback["passed"]:
        raise common.ParityError("the GGUF file does not read back as written: " + "; ".join(readback["problems"][:5]),
                                 where=str(path), fix="report this model and settings")
    hf_logging.disable_progress_bar()
    with quiet_transformers():
        if src.model.config.model_type in gguf_arch.MOE:  # transformers cannot load these GGUF architectures
            loaded = load_back(path, written, src.model)
            tok = PreTrainedTokenizerFast.from_pretrained(str(out), gguf_file=filename, local_files_only=True)
            loader = "the file's tensors dequantized and mapped back into the model (gguf_arch.from_gguf_state)"
        else:
            loaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=filename, dtype=torch.float32,
                                                          local_files_only=True).eval()
            tok = AutoTokenizer.from_pretrained(str(out), gguf_file=filename, local_files_only=True)
            loader = "transformers GGUF loader (dequantized)"
    ids = common.parity_ids(src.tokenizer, cfg.parity.texts)
    result = common.compare(common.torch_logits(src.reference, ids), common.torch_logits(loaded, ids),
                            common.tolerance_for(outtype, cfg.parity.max_rel_error), cfg.parity.min_top1_agreement)
    samples = list(cfg.parity.texts)
    if common.chat_template(src.tokenizer):
        samples.append(src.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there!"}],
                                                         tokenize=False, add_generation_prompt=True))
    mismatched = [s for s in samples if tok(s, add_special_tokens=False)["input_ids"]
                  != src.tokenizer(s, add_special_tokens=False)["input_ids"]]
    result["tokenizer_equal"] = not mismatched
    result["loader"] = loader
    if mismatched:
        result["passed"] = False
        result["tokenizer_mismatch"] = mismatched[:3]
    common.check(result, f"the GGUF export ({outtype})", path)
    if cfg.gguf.modelfile:
        write_modelfile(out / "Modelfile", filename, src.tokenizer)
    types: dict[str, int] = {}
    for info in written["tensors"].values():
        types[info["type"]] = types.get(info["type"], 0) + 1
    return {"parity": result, "readback": readback,
            "gguf": {"file": filename, "outtype": outtype, "architecture": src.model.config.model_type,
                     "bytes": path.stat().st_size, "tensor_types": types, "tokens": written["n_tokens"],
                     "pre_tokenizer": written["pre"], "chat_template": bool(written["chat_template"])}}

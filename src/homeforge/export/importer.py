"""`homeforge import FILE.gguf`: a GGUF (llama.cpp / Ollama) into a plain HF model directory.

transformers' GGUF loader dequantizes the tensors (and reverses llama.cpp's Q/K
permutation) and rebuilds the tokenizer and chat template from the ``tokenizer.*``
metadata. A model loaded that way carries a ``quantization_config`` that makes
``save_pretrained`` refuse, so a plain model is built from the config without it, the
state dict is loaded into it, and that is saved. The written directory is reloaded and
its logits compared with the GGUF-loaded model's before the artifact is committed.

That round trip only shows that the directory holds the dequantized GGUF. It says nothing
about what the file computes in the runtime it came from: llama.cpp runs quantized matrix
products (activations quantized too), so a Q4 file's logits there differ from its dequantized
weights run in fp32. When a llama.cpp build is found (``export/llamacpp.py``), the imported
model is also compared with llama.cpp on the source file (greedy tokens, top-1 agreement,
log-probabilities: ``metrics.parity_llamacpp``); otherwise the manifest and the console say
plainly that only the round trip was checked.
"""

from __future__ import annotations

from pathlib import Path

from homeforge.errors import HomeforgeError
from homeforge.export import common


def default_output(gguf_file: str | Path) -> Path:
    p = Path(gguf_file).expanduser()
    return p.parent / p.stem


def _gguf_summary(path: Path) -> dict:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors on a foreign file
        raise HomeforgeError(f"{path} is not a readable GGUF file ({exc})", where=str(path),
                             fix="pass a .gguf file written by llama.cpp, Ollama or `homeforge export --format gguf`") from None
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1

    def field(key):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    return {"architecture": field("general.architecture"), "name": field("general.name"),
            "tensor_types": types, "tensors": len(reader.tensors),
            "chat_template": field("tokenizer.chat_template") is not None}


def load_gguf(path: Path, dtype=None):
    """(plain transformers model in fp32, tokenizer) from a GGUF file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from homeforge import integrity
    from homeforge.models.io import quiet_transformers

    integrity.check_now(path)  # a GGUF inside a homeforge export is checked against its manifest first
    folder, name = str(path.parent), path.name
    hf_logging.disable_progress_bar()
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                          local_files_only=True)
            config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError, OSError) as exc:
        raise HomeforgeError(f"transformers cannot load {path}: {exc}", where=str(path),
                             fix="import supports the architectures transformers' GGUF loader knows (llama, qwen2, "
                             "mistral, gemma, phi3, ...) in f32/f16/bf16 and the q4/q5/q6/q8 quantizations") from None
    _keep_pre_tokenizer(path, tok)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype or torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise HomeforgeError(f"the weights of {path} do not fit its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}", where=str(path))
    if config.tie_word_embeddings:
        plain.tie_weights()
    return plain.eval(), tok


def _keep_pre_tokenizer(path: Path, tok) -> None:
    """Give the tokenizer the split the GGUF names (``tokenizer.ggml.pre``): transformers' loader
    ignores it (SmolLM2's ``smollm`` splits single digits; it would merge them)."""
    from gguf import GGUFReader

    from homeforge.export import pretok

    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    pre = pretok.definition(field.contents()) if field is not None else None
    backend = getattr(tok, "backend_tokenizer", None)
    if pre is not None and backend is not None:
        backend.pre_tokenizer = pre


def import_gguf(gguf_file: str | Path, out: str | Path | None, cfg, *, force: bool = False, console=None) -> Path:
    """Import ``gguf_file`` into the HF model directory ``out``; return its path."""
    import torch
    from rich.console import Console

    from homeforge import artifacts
    from homeforge.models.io import load_causal_lm, save_model_dir

    console = console or Console(quiet=True)
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise HomeforgeError(f"GGUF file {path} does not exist", fix="pass the path of a .gguf file")
    summary = _gguf_summary(path)
    out_p = Path(out) if out is not None else default_output(path)
    config = cfg.model_dump(mode="json")
    plan = artifacts.plan(out_p, stage="import-gguf", config=config, inputs={"gguf": path}, force=force,
                          encrypt=cfg.encrypt)
    out_abs = plan.out
    if plan.up_to_date:
        console.print(f"[green]up to date[/]: {out_abs} (use --force to import again)")
        return out_abs
    with torch.no_grad(), plan.write() as w:
        with w.timed("load"), console.status(f"loading and dequantizing {path.name}"):
            model, tok = load_gguf(path)
        with w.timed("save"), console.status("saving the model directory and checking parity"):
            dtype = getattr(torch, cfg.dtype)
            ids = common.parity_ids(tok, cfg.parity.texts)
            ref = common.torch_logits(model, ids)
            save_model_dir(model.to(dtype), tok, w.dir)
            reloaded, tok2 = load_causal_lm(w.dir, dtype=torch.float32)
            result = common.compare(ref, common.torch_logits(reloaded, ids),
                                    common.tolerance_for(cfg.dtype, cfg.parity.max_rel_error),
                                    cfg.parity.min_top1_agreement)
            result["tokenizer_equal"] = all(tok2(t, add_special_tokens=False)["input_ids"]
                                            == tok(t, add_special_tokens=False)["input_ids"] for t in cfg.parity.texts)
            result["chat_template"] = common.chat_template(tok2) is not None
            if not result["tokenizer_equal"]:
                result["passed"] = False
            result["compared_with"] = "transformers' dequantized load of the GGUF (round trip only)"
            common.check(result, f"the imported model ({path.name})", out_abs)
        with w.timed("llamacpp"), console.status("comparing with llama.cpp on the source file"):
            runtime = _llamacpp_parity(path, reloaded, tok2, cfg)
        w.metrics.update({"parity": result, "parity_llamacpp": runtime,
                          "source": {**summary, "file": path.name, "bytes": path.stat().st_size}})
        w.extra["kind"] = "model"
    console.print(f"  round trip: max rel. logit error {result['max_rel_error']:.2e} (tolerance {result['tolerance']:.3g}) "
                  "against transformers' dequantized GGUF; this is not parity with the runtime the file came from")
    console.print("  " + describe_runtime(runtime))
    console.print(f"[green]wrote[/] {out_abs}")
    return out_abs


def _llamacpp_parity(path: Path, model, tok, cfg) -> dict:
    """The imported model against llama.cpp on the source GGUF, or why that was not checked."""
    from homeforge.export import llamacpp

    if cfg.llamacpp_tokens == 0:
        return {"checked": False, "reason": "llamacpp_tokens=0"}
    if llamacpp.binary("llama-server") is None:
        return {"checked": False, "reason": "no llama.cpp build found (HOMEFORGE_LLAMACPP, docs/export.md)"}
    prompts = common.parity_ids(tok, cfg.parity.texts)
    with llamacpp.LlamaServer(path) as server:
        res = llamacpp.runtime_parity(server, model, prompts, n=cfg.llamacpp_tokens, eog=llamacpp.eog_ids(tok))
        samples = list(cfg.parity.texts)
        res["tokenizer_equal"] = all(server.tokenize(t) == tok(t, add_special_tokens=False)["input_ids"]
                                     for t in samples)
    return {"checked": True, **res}


def describe_runtime(res: dict) -> str:
    if not res.get("checked"):
        return (f"not compared with llama.cpp ({res['reason']}): only the dequantized round trip was checked, "
                "not what llama.cpp computes on this file")
    return (f"against llama.cpp on the source file: identical greedy tokens {res['identical_prefix_min']}/"
            f"{res['tokens_per_prompt']} (shortest of {len(res['prompts'])} prompts), top-1 agreement "
            f"{res['top1_agreement']:.3f}, max |log-prob difference| {res['max_logprob_diff']:.3g}, tokenizer "
            f"{'equal' if res['tokenizer_equal'] else 'DIFFERENT'}")


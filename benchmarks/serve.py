"""Serving throughput and latency: `homeforge serve` vs a naive server, side by side.

The naive peer is what people write first: a FastAPI server that runs Hugging Face
``model.generate`` for one request at a time (a lock around it), streaming tokens through
a ``BaseStreamer``. Both serve the same model directory with the same settings: greedy,
``max_tokens`` new tokens per request (``ignore_eos`` / ``min_new_tokens``, so every
request produces the same token count), the same torch thread count, each in its own
process. Each client streams (``stream: true``) and measures time to first token (TTFT)
and end-to-end latency; throughput is completion tokens / wall time of the whole level.
Levels of 1, 4 and 16 concurrent closed-loop clients; for every level the two servers
alternate (homeforge, naive, homeforge, naive, ...) and medians over rounds are reported.
Peak resident memory of each server process is read from /proc (VmHWM).

The model is the ``small`` preset (8 layers, hidden 512, ~30M parameters with an
8192-token BPE trained here on stdlib docstrings; random weights: speed does not depend
on them) or ``--model DIR``. llama.cpp is added as a peer only if ``llama_cpp`` is
already importable (it is not built here).

    python benchmarks/serve.py --quick      # smoke run (debug model, ~1 minute)
    python benchmarks/serve.py --plot benchmarks/serve.png   # full run (~10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(preset="small", vocab=8192, chars=1_000_000, levels=(1, 4, 16), max_tokens=64, rounds=3,
            requests_per_client=3, prompt_words=40)
QUICK = dict(preset="debug", vocab=512, chars=150_000, levels=(1, 4), max_tokens=16, rounds=1,
             requests_per_client=2, prompt_words=12)


# --------------------------------------------------------------------------- the naive peer server


def naive_server(model_dir: str, port: int, threads: int) -> None:
    """One request at a time through transformers' generate, streamed token by token."""
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    lock = threading.Lock()
    app = FastAPI()

    class QueueStreamer(BaseStreamer):
        def __init__(self, loop, q):
            self.loop, self.q, self.first = loop, q, True

        def put(self, value):
            if self.first:  # generate() puts the prompt first
                self.first = False
                return
            self.loop.call_soon_threadsafe(self.q.put_nowait, value.reshape(-1).tolist())

        def end(self):
            self.loop.call_soon_threadsafe(self.q.put_nowait, None)

    @app.get("/ready")
    async def ready():
        return {"status": "ready"}

    async def completions(request):
        body = await request.json()
        ids = torch.tensor([tok(body["prompt"])["input_ids"]])
        n = int(body.get("max_tokens", 16))
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def work():
            with lock, torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=tok.pad_token_id,
                               streamer=QueueStreamer(loop, q))

        task = asyncio.get_running_loop().run_in_executor(None, work)

        async def stream():
            count = 0
            while True:
                toks = await q.get()
                if toks is None:
                    break
                count += len(toks)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': tok.decode(toks)}]})}\n\n"
            await task
            yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': count}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    completions.__annotations__ = {"request": Request}  # resolved here: this module uses postponed annotations
    app.post("/v1/completions")(completions)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --------------------------------------------------------------------------- setup


def build_model(out: Path, preset: str, vocab: int, chars: int) -> Path:
    from homeforge.data.corpus import stdlib_docstrings
    from homeforge.data.tokenizer import train_bpe
    from homeforge.models.io import save_model_dir
    from homeforge.models.presets import build_model as build
    from homeforge.models.presets import count_params, preset_config

    docs = stdlib_docstrings(chars)
    tok = train_bpe(docs, vocab_size=vocab)
    cfg = preset_config(preset, len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    model = build(cfg, seed=0)
    save_model_dir(model, tok, out)
    print(f"model: preset {preset}, {count_params(model) / 1e6:.1f}M parameters, vocab {len(tok)}")
    (out / "bench_prompts.json").write_text(json.dumps(docs[:400]))
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, model_dir: Path, threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HOMEFORGE_HOME": str(model_dir.parent / "home")}
    if kind == "homeforge":
        cmd = [sys.executable, "-m", "homeforge", "serve", str(model_dir), "--port", str(port),
               f"threads={threads}", f"max_batch_size={max_batch}", "max_queue=1024"]
    else:
        cmd = [sys.executable, __file__, "--naive-server", str(model_dir), "--port", str(port),
               "--threads", str(threads)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{kind} server did not become ready")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- load generation


async def one_request(client, base: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{base}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft if ttft is not None else float("nan"), time.perf_counter() - t0, tokens


async def level(base: str, prompts: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=httpx.Limits(max_connections=clients + 4)) as c:
        await one_request(c, base, prompts[0], 2)  # warm-up
        results: list[tuple[float, float, int]] = []

        async def client(k: int):
            for j in range(per_client):
                results.append(await one_request(c, base, prompts[(k * per_client + j) % len(prompts)], max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    lat = sorted(r[1] for r in results)
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    qt = statistics.quantiles(ttft, n=100, method="inclusive") if len(ttft) > 1 else ttft * 99
    return {"tok_s": tokens / wall, "p50": q[49], "p99": q[98], "ttft_p50": qt[49], "ttft_p99": qt[98],
            "tokens": tokens, "requests": len(results)}


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: debug model, fewer levels and rounds")
    ap.add_argument("--model", type=Path, help="serve this model directory instead of building one")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    ap.add_argument("--max-batch", type=int, default=16, help="homeforge max_batch_size")
    ap.add_argument("--plot", type=Path, help="write a PNG: tokens/s and TTFT against concurrent clients")
    ap.add_argument("--naive-server", type=str, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_server:
        return naive_server(args.naive_server, args.port, args.threads)

    s = QUICK if args.quick else FULL
    try:
        import llama_cpp  # noqa: F401

        print("note: llama-cpp-python is importable, but its peer (GGUF server) is not wired in yet")
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp peer skipped (it is not built here)")
    with tempfile.TemporaryDirectory(prefix="hf-bench-serve-") as tmp:
        model_dir = args.model or build_model(Path(tmp) / "model", s["preset"], s["vocab"], s["chars"])
        pf = model_dir / "bench_prompts.json"
        docs = json.loads(pf.read_text()) if pf.exists() else [
            "The quick brown fox jumps over the lazy dog. " * 8] * 16
        prompts = [" ".join(d.split()[: s["prompt_words"]]) for d in docs if len(d.split()) >= s["prompt_words"]]
        prompts = prompts[:64] or ["Hello world " * s["prompt_words"]]
        servers = {k: start(k, model_dir, args.threads, args.max_batch) for k in ("homeforge", "naive")}
        rows: dict = {}
        try:
            for clients in s["levels"]:
                for rnd in range(s["rounds"]):
                    for kind in ("homeforge", "naive") if rnd % 2 == 0 else ("naive", "homeforge"):
                        r = asyncio.run(level(servers[kind][1], prompts, clients, s["requests_per_client"],
                                              s["max_tokens"]))
                        rows.setdefault((clients, kind), []).append(r)
                        print(f"  clients={clients:>2} round={rnd} {kind:<9} {r['tok_s']:8.1f} tok/s  "
                              f"p50 {r['p50']:.2f}s  p99 {r['p99']:.2f}s  ttft p50 {r['ttft_p50']:.3f}s", flush=True)
            peaks = {k: peak_rss_mb(p.pid) for k, (p, _) in servers.items()}
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    print()
    print(f"model {model_dir.name if args.model else s['preset']}, {s['max_tokens']} new tokens per request, "
          f"greedy, {args.threads} torch threads per server, medians of {s['rounds']} rounds")
    head = ("| clients | homeforge tok/s | naive tok/s | ratio | homeforge p50 / p99 s | naive p50 / p99 s | "
            "homeforge TTFT p50 / p99 s | naive TTFT p50 / p99 s |")
    print(head)
    print("|---|---|---|---|---|---|---|---|")
    for clients in s["levels"]:
        h, n = med[(clients, "homeforge")], med[(clients, "naive")]
        print(f"| {clients} | {h['tok_s']:.1f} | {n['tok_s']:.1f} | {h['tok_s'] / n['tok_s']:.2f}x | "
              f"{h['p50']:.2f} / {h['p99']:.2f} | {n['p50']:.2f} / {n['p99']:.2f} | "
              f"{h['ttft_p50']:.3f} / {h['ttft_p99']:.3f} | {n['ttft_p50']:.3f} / {n['ttft_p99']:.3f} |")
    print(f"peak RSS: homeforge {peaks['homeforge']:.0f} MB, naive {peaks['naive']:.0f} MB")
    top = max(s["levels"])
    ratio = med[(top, "homeforge")]["tok_s"] / med[(top, "naive")]["tok_s"]
    goal = "" if args.quick else f" (goal >= 4x: {'met' if ratio >= 4 else 'NOT met'})"
    print(f"throughput ratio at {top} clients: {ratio:.2f}x{goal}")
    if args.plot:
        plot(med, s["levels"], args.plot)
        print(f"plot: {args.plot}")


def plot(med: dict, levels, out: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style, colour in (("homeforge", "o-", "tab:blue"), ("naive", "s--", "tab:orange")):
        a.plot(levels, [med[(c, kind)]["tok_s"] for c in levels], style, color=colour, label=kind)
        b.plot(levels, [med[(c, kind)]["ttft_p50"] for c in levels], style, color=colour, label=f"{kind} p50")
        b.plot(levels, [med[(c, kind)]["ttft_p99"] for c in levels], style, color=colour, alpha=0.4,
               label=f"{kind} p99")
    a.set(xlabel="concurrent clients", ylabel="completion tokens / s", title="throughput", xscale="log")
    b.set(xlabel="concurrent clients", ylabel="seconds", title="time to first token", xscale="log", yscale="log")
    for ax in (a, b):
        ax.set_xticks(list(levels), [str(c) for c in levels])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()

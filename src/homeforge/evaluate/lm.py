"""Language-model evaluation: sliding-window perplexity per document, greedy generation
with speed measurement, and sequence-classifier predictions."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F


def windows_for(ids: list[int], context: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over one sequence: (begin, end, n_scored).

    Every position 1..len-1 is scored exactly once; a window of up to ``context`` tokens
    scores its last ``n_scored`` targets, so each scored token sees at least
    ``context - stride`` tokens of left context (except near the start).
    """
    n = len(ids)
    out = []
    prev_end = 1  # position 0 has no context and is never a target
    begin = 0
    while prev_end < n:
        end = min(begin + context, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        begin += stride
        if end == n:
            break
    return out


@torch.no_grad()
def document_nll(model, docs: list[list[int]], context: int, stride: int | None = None, batch_size: int = 8,
                 progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed next-token NLL (nats) and scored-token count of every document.

    Each document should already start with its context token (BOS or EOS). Windows of
    all documents are sorted by length and batched with right padding (causal attention
    makes the padding invisible to real positions).
    """
    stride = stride or max(1, context // 2)
    if not 0 < stride <= context - 1 and context > 1:
        stride = max(1, min(stride, context - 1))
    jobs = []
    for d, ids in enumerate(docs):
        for begin, end, n_scored in windows_for(ids, context, stride):
            jobs.append((end - begin, d, begin, end, n_scored))
    jobs.sort()
    nll = np.zeros(len(docs))
    count = np.zeros(len(docs), dtype=np.int64)
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s : s + batch_size]
        width = max(j[0] for j in chunk)
        x = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (length, d, begin, end, _n) in enumerate(chunk):
            x[r, :length] = torch.tensor(docs[d][begin:end])
            mask[r, :length] = 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        tok_nll = -logp.gather(-1, x[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
        for r, (length, d, _b, _e, n_scored) in enumerate(chunk):
            nll[d] += float(tok_nll[r, length - 1 - n_scored : length - 1].sum())
            count[d] += n_scored
        if progress:
            progress(len(chunk))
    return nll, count


def count_windows(docs: list[list[int]], context: int, stride: int) -> int:
    return sum(len(windows_for(ids, context, stride)) for ids in docs)


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts_ids: list[list[int]], max_new_tokens: int,
                    progress: Callable[[int], None] | None = None) -> tuple[list[str], dict]:
    """Greedy continuation of each prompt (batch 1, as a user request); returns texts and
    speed figures: tokens/s over all requests, per-request latency p50/p95 (ms)."""
    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    texts, latencies, new_tokens = [], [], 0
    if prompts_ids:  # warm-up (allocator, kernels), not timed
        x = torch.tensor([prompts_ids[0]], device=device)
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=2, do_sample=False,
                       temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    for ids in prompts_ids:
        x = torch.tensor([ids], device=device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=eos,
                             pad_token_id=pad)
        latencies.append(time.perf_counter() - t0)
        gen = out[0, len(ids):]
        new_tokens += int(gen.numel())
        texts.append(tokenizer.decode(gen, skip_special_tokens=True))
        if progress:
            progress(1)
    total = sum(latencies)
    lat = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    speed = {"requests": len(latencies), "new_tokens": new_tokens,
             "tokens_per_s": new_tokens / total if total > 0 else float("nan"),
             "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p95": float(np.percentile(lat, 95))}
    return texts, speed


@torch.no_grad()
def classify(model, inputs: list[list[int]], batch_size: int = 16,
             progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Class probabilities [n, n_classes] of a sequence classifier.

    Sequences are grouped by length so no padding is needed (HF classifiers pick the
    last non-pad token, which padding with an EOS-valued pad would confuse).
    """
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    probs: list[np.ndarray | None] = [None] * len(inputs)
    s = 0
    while s < len(order):
        length = len(inputs[order[s]])
        e = s
        while e < len(order) and e - s < batch_size and len(inputs[order[e]]) == length:
            e += 1
        idx = order[s:e]
        x = torch.tensor([inputs[i] for i in idx])
        logits = model(input_ids=x).logits.float()
        p = torch.softmax(logits, dim=-1).numpy()
        for r, i in enumerate(idx):
            probs[i] = p[r]
        if progress:
            progress(len(idx))
        s = e
    return np.stack(probs) if probs else np.zeros((0, 0))


def ppl(nll_sum: float, tokens: int) -> float:
    return math.exp(min(nll_sum / tokens, 50.0)) if tokens else float("nan")


def prefix_id(tok) -> int:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def text_docs(rows: list[dict], tok, path) -> tuple[list[list[int]], list[str]]:
    """Token ids ``[BOS, *text, EOS]`` of text records (and their texts), for perplexity."""
    from homeforge.errors import HomeforgeError

    texts = [r.get("text") for r in rows]
    if any(not isinstance(t, str) for t in texts):
        raise HomeforgeError(f"{path} has records without a 'text' string", where=str(path),
                             fix="a text dataset's records are {\"text\": ...}; check the dataset kind")
    enc = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    start, eos = prefix_id(tok), tok.eos_token_id
    return [[start, *ids, eos] for ids in enc], texts

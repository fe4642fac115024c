"""Where a local llama.cpp is, and running it: the reference runtime for our GGUF files.

One place finds llama.cpp for the package, the tests and the benchmarks:
``$HOMEFORGE_LLAMACPP`` or ``~/.cache/homeforge/llamacpp`` (``paths.llamacpp_dir``), holding
either a llama.cpp source tree (``convert_hf_to_gguf.py``, ``build/bin/llama-server``) or an
untarred ``llama-cpp-python`` sdist (``llama_cpp_python-*/vendor/llama.cpp``). homeforge never
downloads or builds it at run time; docs/export.md shows how to build it once. Nothing here
reaches beyond 127.0.0.1.

``LlamaServer`` starts ``llama-server`` on a GGUF and asks it what it computes: tokenization,
greedy continuations of token-id prompts, and the top log-probabilities of each generated token
(a plain softmax of llama.cpp's logits), which is what ``runtime_parity`` compares with a
transformers model.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np

from homeforge import paths
from homeforge.errors import HomeforgeError


def source_dir(root: Path | None = None) -> Path | None:
    """The llama.cpp source tree (with ``convert_hf_to_gguf.py``) under ``root``, else None."""
    root = root or paths.llamacpp_dir()
    candidates = [root, root / "vendor" / "llama.cpp", *sorted(root.glob("llama_cpp_python-*/vendor/llama.cpp"),
                                                              reverse=True)]
    return next((c for c in candidates if (c / "convert_hf_to_gguf.py").is_file()), None)


def binary(name: str, root: Path | None = None) -> Path | None:
    """A built llama.cpp program (``llama-server``, ``llama-completion``), else None."""
    root = root or paths.llamacpp_dir()
    src = source_dir(root)
    candidates = [root / "bin" / name, root / name] + ([src / "build" / "bin" / name] if src else [])
    found = next((c for c in candidates if c.is_file()), None)
    if found is None and (which := shutil.which(name)):
        found = Path(which)
    return found


def converter(root: Path | None = None) -> tuple[Path, Path] | None:
    """(``convert_hf_to_gguf.py``, its ``gguf-py`` for PYTHONPATH), else None."""
    src = source_dir(root)
    if src is None or not (src / "gguf-py" / "gguf").is_dir():
        return None
    return src / "convert_hf_to_gguf.py", src / "gguf-py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """``llama-server`` on one GGUF file, on 127.0.0.1, for the duration of a ``with`` block."""

    def __init__(self, gguf_file: Path, *, threads: int = 2, ctx: int = 2048, exe: Path | None = None,
                 timeout: float = 120.0, kv_f32: bool = False):
        self.exe = exe or binary("llama-server")
        if self.exe is None:
            raise HomeforgeError("llama-server was not found", where=str(paths.llamacpp_dir()),
                                 fix="build llama.cpp once (docs/export.md, 'Checking with llama.cpp') or set "
                                 "HOMEFORGE_LLAMACPP to a llama.cpp build")
        self.file, self.threads, self.ctx, self.timeout = Path(gguf_file), threads, ctx, timeout
        self.kv = ["-ctk", "f32", "-ctv", "f32"] if kv_f32 else []  # llama.cpp's KV cache is f16 by default
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> LlamaServer:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(self.file.parent / f".{self.file.name}.llama-server.log", "w+b")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(self.exe), "-m", str(self.file), "--host", "127.0.0.1", "--port", str(port), "-t", str(self.threads),
             "-c", str(self.ctx), "-np", "1", "--no-webui", *self.kv],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.__exit__(None, None, None)
        raise HomeforgeError(f"llama-server did not start on {self.file}: {self.output()[-600:]}", where=str(self.file),
                             fix="check that this llama.cpp build supports the file's architecture")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def _post(self, route: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """llama.cpp's token ids of ``text`` (no BOS added; special tokens parsed when ``special``)."""
        return list(self._post("/tokenize", {"content": text, "add_special": False, "parse_special": special})["tokens"])

    def greedy(self, ids: list[int], n: int, n_probs: int = 0, cache: bool = False) -> dict:
        """Greedy continuation of the token-id prompt ``ids``: {"tokens", "top": [[(id, logprob)...] per token]}."""
        r = self._post("/completion", {"prompt": list(ids), "n_predict": n, "temperature": -1.0, "top_k": 1,
                                       "ignore_eos": True, "return_tokens": True, "n_probs": n_probs,
                                       "cache_prompt": cache, "samplers": ["top_k"]})
        top = [[(int(t["id"]), float(t["logprob"])) for t in p.get("top_logprobs", [])]
               for p in r.get("completion_probabilities", [])]
        return {"tokens": [int(t) for t in r["tokens"]], "top": top, "timings": r.get("timings", {})}


# end-of-generation tokens llama.cpp recognises by their text (llama-vocab.cpp); with ignore_eos
# it never generates them, so the transformers side must not either
EOG_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>", "<|eom_id|>",
             "<EOT>", "</s>")


def eog_ids(tokenizer) -> set[int]:
    """The end-of-generation token ids llama.cpp's ``ignore_eos`` suppresses, for this tokenizer."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    return ids | {vocab[t] for t in EOG_TEXTS if t in vocab}


def hf_greedy(model, ids: list[int], n: int, suppress: set[int] | None = None) -> tuple[list[int], list[np.ndarray]]:
    """transformers' greedy continuation and the log-softmax at each generated position.

    ``suppress``: token ids never generated (their logits -inf), as llama.cpp's ``ignore_eos``
    does with the end-of-generation tokens. The whole sequence is run at every step (no KV
    cache): slower, but independent of the cache API of the transformers version.
    """
    import torch

    seq = list(ids)
    logps = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            if suppress:
                logits[list(suppress)] = float("-inf")
            lp = torch.log_softmax(logits, -1).numpy()
            logps.append(lp)
            seq.append(int(lp.argmax()))
    return seq[len(ids):], logps


def runtime_parity(server: LlamaServer, model, prompts: list[list[int]], n: int = 32, n_probs: int = 8,
                   eog: set[int] | None = None) -> dict:
    """Compare llama.cpp with a transformers model on token-id prompts, greedy, ``n`` tokens each.

    Per prompt: the identical-token prefix of the two free-running greedy continuations; then,
    teacher-forced on transformers' continuation (the same context at every position), the
    fraction of positions where llama.cpp's top-1 token is transformers' (top-1 agreement),
    the largest |log-probability difference| over llama.cpp's top ``n_probs`` tokens (each taken
    relative to the first of them, so that the two sides' normalisations cancel), and how
    many different top-1 tokens are *not* near-ties (transformers' own gap between the two
    tokens larger than twice that position's log-prob difference): a correct file can differ
    at a near-tie through float rounding alone; it should not differ anywhere else. ``eog``:
    the end-of-generation ids (``eog_ids``), suppressed on the transformers side because
    llama.cpp runs with ``ignore_eos`` to give ``n`` tokens.
    """
    per_prompt = []
    for ids in prompts:
        ref, ref_lp = hf_greedy(model, ids, n, suppress=eog)
        free = server.greedy(ids, n)["tokens"]
        same = next((i for i, (a, b) in enumerate(zip(ref, free, strict=False)) if a != b), min(len(ref), len(free)))
        agree, diffs, untied = [], [], 0
        for i in range(n):
            step = server.greedy(ids + ref[:i], 1, n_probs, cache=True)
            agree.append(step["tokens"][0] == ref[i])
            top = [(tid, lp) for tid, lp in (step["top"][0] if step["top"] else []) if tid not in (eog or ())]
            # relative to the first of those tokens: the two sides normalise over different sets (llama.cpp's
            # probabilities include the end-of-generation tokens that transformers' side suppresses)
            a, a_lp = top[0] if top else (None, 0.0)
            diffs.append(max((abs(float(ref_lp[i][tid] - ref_lp[i][a]) - (lp - a_lp)) for tid, lp in top),
                             default=0.0))
            if not agree[-1]:  # a different top-1 is a near-tie if transformers' own top-2 are closer than the error
                gap = float(ref_lp[i][ref[i]] - ref_lp[i][step["tokens"][0]])
                untied += gap > 2 * diffs[-1]
        per_prompt.append({"identical_prefix": same, "of": n, "top1_agreement": float(np.mean(agree)),
                           "max_logprob_diff": max(diffs), "logprob_diffs": [round(d, 5) for d in diffs],
                           "disagreements_not_ties": int(untied)})
    return {"runtime": "llama.cpp (llama-server)", "tokens_per_prompt": n, "prompts": per_prompt,
            "identical_prefix_min": min(p["identical_prefix"] for p in per_prompt),
            "all_identical": all(p["identical_prefix"] == n for p in per_prompt),
            "top1_agreement": float(np.mean([p["top1_agreement"] for p in per_prompt])),
            "max_logprob_diff": max(p["max_logprob_diff"] for p in per_prompt),
            "disagreements_not_ties": sum(p["disagreements_not_ties"] for p in per_prompt)}

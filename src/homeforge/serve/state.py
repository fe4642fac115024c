"""What one server holds: config, keys, limiter, metrics, audit, and the loaded model.

``load_model`` turns a model directory and a backend choice into (kind, model, tokenizer,
engine backend); ``ServerState.load`` runs it (in a background thread at startup, so
``/health`` answers while the weights load) and starts the continuous-batching engine.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from homeforge.config import ServeConfig
from homeforge.errors import HomeforgeError
from homeforge.serve.auth import KeyStore, RateLimiter
from homeforge.serve.metrics import Metrics

if TYPE_CHECKING:
    from homeforge.serve.engine import Engine


def detect_kind(model_dir: Path) -> str:
    from homeforge.models.io import classifier_architecture

    return "classifier" if classifier_architecture(model_dir) else "causal"


def resolve_backend(cfg: ServeConfig) -> ServeConfig:
    """``backend=auto``: ONNX Runtime for a directory that holds an ONNX graph and no weights, else PyTorch."""
    if cfg.backend != "auto":
        return cfg
    p = Path(cfg.model_dir or "")
    onnx_only = (p / cfg.onnx_file).is_file() and not any(p.glob("*.safetensors")) and not any(p.glob("*.bin"))
    return cfg.model_copy(update={"backend": "onnx" if onnx_only else "torch"})


def load_model(cfg: ServeConfig):
    """(kind, model, tokenizer, backend) for ``cfg.model_dir`` and ``cfg.backend``."""
    from homeforge.models.io import check_model_dir, load_causal_lm, load_classifier, load_tokenizer

    cfg = resolve_backend(cfg)
    if cfg.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise HomeforgeError("the vLLM backend needs the `vllm` package, which is not installed",
                                 fix="install it on a GPU machine (pip install vllm), or use --backend torch") from None
        raise HomeforgeError("vLLM does not run inside this process: it runs as its own server behind homeforge",
                             fix=f"homeforge serve {cfg.model_dir} --backend vllm (starts `vllm serve` behind the "
                                 "gateway), or --upstream URL for a vLLM server already running")
    from homeforge.vision.task import is_vision_model

    if is_vision_model(cfg.model_dir or ""):  # image / image+text classifier (PyTorch or its ONNX export)
        from homeforge.vision.task import load_model as load_vision_model

        model, meta, tok = load_vision_model(cfg.model_dir or "", onnx=cfg.onnx_file if cfg.backend == "onnx" else None,
                                             threads=cfg.threads)
        model.homeforge_vision = meta
        return "classifier", model, tok, None
    if cfg.backend == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise HomeforgeError("the ONNX Runtime backend needs the onnxruntime package",
                                 fix="pip install 'homeforge[export]', or use --backend torch") from None
        from homeforge.serve.backends import OnnxBackend

        p = Path(cfg.model_dir or "")
        if not (p / "config.json").is_file():
            raise HomeforgeError(f"{p} is not an exported model directory (no config.json)", where=str(p),
                                 fix="pass the output of `homeforge export MODEL --format onnx`")
        backend = OnnxBackend(p, cfg.onnx_file, cfg.threads)
        return "causal", None, load_tokenizer(p), backend
    p = check_model_dir(cfg.model_dir or "")
    kind = detect_kind(p)
    if kind == "classifier":
        model, tok = load_classifier(p)
        return kind, model, tok, None
    from homeforge.serve.engine import TorchBackend  # torch: only when this process runs a model

    model, tok = load_causal_lm(p)
    return kind, model, tok, TorchBackend(model)


def make_engine(cfg: ServeConfig, backend, tok) -> Engine:
    """The lean slot engine where the model supports it (``cfg.engine``), else the generic one."""
    from homeforge.serve.engine import Engine, TorchBackend
    from homeforge.serve.lean import supports
    from homeforge.serve.lean_engine import SlotEngine

    kw = dict(max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue, max_context=cfg.max_context)
    lean = isinstance(backend, TorchBackend) and supports(backend.model)
    if cfg.engine == "lean" and not lean:
        raise HomeforgeError(f"engine=lean does not support this model ({type(getattr(backend, 'model', backend)).__name__}"
                             f"; backend {cfg.backend})", where=str(cfg.model_dir),
                             fix="use engine=auto (the generic engine for other models) or a Llama/Mistral/Qwen2/Qwen3 "
                                 "model on the torch backend")
    if lean and cfg.engine != "generic":
        return SlotEngine(backend, tok, prefill_chunk=cfg.prefill_chunk, prefix_cache_tokens=cfg.prefix_cache_tokens,
                          **kw)
    return Engine(backend, tok, **kw)


def open_feedback(cfg: ServeConfig):
    """The feedback log (``continual.feedback``) when ``feedback.enabled``, else None."""
    fc = cfg.feedback
    if not fc.enabled:
        return None
    from homeforge import paths
    from homeforge.continual.feedback import FeedbackLog

    return FeedbackLog(fc.dir or paths.home() / "feedback", encrypt=fc.encrypt, max_mb=fc.max_mb,
                       retention_days=fc.retention_days, max_files=fc.max_files, scrub=fc.scrub)


class ServerState:
    """Config and services of one server, and the model it serves (``driver`` is set by ``create_app``)."""

    def __init__(self, cfg: ServeConfig, keys: KeyStore | None = None, audit=None):
        from homeforge.registry.follow import resolve

        cfg, self.follow, self.version = resolve(cfg)  # registry:NAME@ALIAS: the version it names now
        self.swap_lock = asyncio.Lock()
        self.swaps: list[dict] = []  # every version swap of this process
        self.swap_error: str | None = None  # the last alias change that could not be swapped in (old one serves)
        self.cfg = cfg
        self.name = cfg.model_name or (Path(cfg.model_dir).name if cfg.model_dir else "model")
        self.keys = keys if keys is not None else KeyStore.open(cfg.keys_file)
        self.limiter = RateLimiter()
        self.metrics = Metrics()
        self.metrics.watch(lambda: self.engine)
        self.audit = audit
        self.driver = None
        self.engine: Engine | None = None
        self.kind = "causal"
        self.model = None
        self.tok = None
        self.load_error: str | None = None  # the model failed to load (final)
        self.waiting: str | None = None  # why it is not ready yet, when it may still become ready (gateway)
        self.created = int(time.time())
        self._cls_lock = threading.Lock()
        self.open_ledgers: set = set()  # generations whose accounting is not complete yet
        self.grpc_port: int | None = None  # bound by the app's lifespan when cfg.grpc_port is set
        self.ready = False
        self.feedback = open_feedback(cfg)  # None unless feedback.enabled
        self.responses: dict[str, str | None] = {}  # recent response id -> arm (what feedback may refer to)

    def load(self) -> None:
        import torch

        try:
            if self.cfg.threads:
                torch.set_num_threads(self.cfg.threads)
            self.cfg = resolve_backend(self.cfg)
            self.kind, self.model, self.tok, backend = load_model(self.cfg)
            if backend is not None:
                # the engine thread gets its own tokenizer: a Rust tokenizer shared between threads can
                # fail with 'Already borrowed' when one thread changes its settings
                self.engine = make_engine(self.cfg, backend, copy.deepcopy(self.tok)).start()
            self.ready = True
        except Exception as exc:  # shown by /ready and the log; the process keeps answering /health
            self.load_error = exc.render() if isinstance(exc, HomeforgeError) else f"{type(exc).__name__}: {exc}"

    @property
    def max_context(self) -> int:
        if self.engine is not None:
            return self.engine.max_context
        return int(self.cfg.max_context or getattr(getattr(self.model, "config", None), "max_position_embeddings", 512)
                   or 512)

    def keys_required(self) -> bool:
        if self.cfg.require_keys is not None:
            return self.cfg.require_keys
        return bool(self.keys.active())

    def generation_config(self):
        if self.model is not None:
            return getattr(self.model, "generation_config", None)
        if not hasattr(self, "_gen_cfg"):
            from transformers import GenerationConfig

            try:
                self._gen_cfg = GenerationConfig.from_pretrained(self.cfg.model_dir, local_files_only=True)
            except OSError:
                self._gen_cfg = None
        return self._gen_cfg

    @property
    def vocab_size(self) -> int:
        if self.engine is not None:
            return self.engine.backend.vocab_size
        return int(self.model.config.vocab_size)

    def stop_ids(self, chat: bool) -> set[int]:
        ids: set[int] = set()
        if self.tok.eos_token_id is not None:
            ids.add(int(self.tok.eos_token_id))
        gen_eos = getattr(self.generation_config(), "eos_token_id", None)
        if gen_eos is not None:
            ids |= {int(x) for x in (gen_eos if isinstance(gen_eos, list) else [gen_eos])}
        if chat:
            for t in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
                tid = self.tok.convert_tokens_to_ids(t)
                if isinstance(tid, int) and tid != self.tok.unk_token_id and tid >= 0:
                    ids.add(tid)
        return ids

    def remember(self, response_id: str, arm: str | None) -> None:
        """Keep a response id that feedback may refer to (the oldest are forgotten past feedback.remember)."""
        self.responses[response_id] = arm
        while len(self.responses) > self.cfg.feedback.remember:
            self.responses.pop(next(iter(self.responses)))

    def close_ledgers(self) -> None:
        """Complete the accounting of generations whose producer will not report any more (shutdown)."""
        for ledger in list(self.open_ledgers):
            ledger.close("cancelled")

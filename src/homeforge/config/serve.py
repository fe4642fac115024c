"""The `serve` stage's schema, with the gateway's upstreams."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from homeforge.config.base import Section
from homeforge.config.continual import AbConfig, FeedbackConfig


class UpstreamConfig(Section):
    """One OpenAI-compatible server behind the gateway (vLLM, llama.cpp's llama-server, TGI, homeforge)."""

    url: str = Field(description="base URL, e.g. http://127.0.0.1:8001 (a non-loopback host must be allowed: "
                     "HOMEFORGE_ALLOW_HOSTS)")
    key_file: str | None = Field(None, description="file holding the bearer key the upstream expects (never logged)")
    key_env: str | None = Field(None, description="environment variable holding that key (instead of key_file)")
    model: str | None = Field(None, description="the upstream's model id to request (default: the first one its "
                              "/v1/models lists)")


class GatewayConfig(Section):
    """Gateway mode (`upstreams` set or `backend: vllm`): homeforge's keys, limits, audit and metrics in front of
    other OpenAI-compatible servers, with least-busy balancing, health checks and failover."""

    key_file: str | None = Field(None, description="bearer key file for upstreams that name none (--upstream-key-file)")
    key_env: str | None = Field(None, description="environment variable with that key (--upstream-key-env)")
    health_interval: float = Field(5.0, gt=0, description="seconds between health checks of a healthy upstream")
    max_backoff: float = Field(30.0, gt=0, description="longest wait between checks of an unhealthy upstream "
                               "(the wait doubles from 0.5 s after each failed check)")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to connect to an upstream")
    read_timeout: float = Field(600.0, gt=0, description="seconds an upstream may stay silent during a request")
    command: list[str] | None = Field(None, description="start this upstream as a managed child process; "
                                      "placeholders {port} {host} {model_dir} {model_name} (--backend vllm sets "
                                      "`vllm serve {model_dir} ...`)")
    extra_args: list[str] = Field(default_factory=list, description="arguments appended to the managed command, "
                                  "e.g. [--tensor-parallel-size, '2']")
    ready_timeout: float = Field(1800.0, gt=0, description="seconds the managed child may take to become healthy")
    log_file: str | None = Field(None, description="the managed child's output (default: "
                                 "$HOMEFORGE_HOME/logs/upstream-PORT.log)")


class ServeConfig(Section):
    """Serving: OpenAI-compatible HTTP API with continuous batching, API keys, metrics, audit."""

    model_dir: str | None = Field(None, description="local model directory to serve (the CLI argument sets it)")
    model_name: str | None = Field(None, description="model id clients pass as `model` (default: the directory name)")
    host: str = Field("127.0.0.1", description="bind address; a non-loopback address requires API keys")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    backend: Literal["auto", "torch", "onnx", "vllm"] = Field(
        "auto", description="inference backend (auto = onnx for an ONNX export directory, else torch)")
    registry_poll: float = Field(1.0, gt=0, description="serving registry:NAME@ALIAS: seconds between checks of "
                                 "the registry for a new version of the alias (swapped in without downtime)")
    onnx_file: str = Field("model.onnx", description="ONNX backend: graph file in the exported directory "
                                                     "(model.int8.onnx for the int8 export)")
    max_batch_size: int = Field(16, ge=1, description="sequences decoded together in one step")
    engine: Literal["auto", "lean", "generic"] = Field(
        "auto", description="torch backend: lean = slot KV cache and direct layer calls (Llama, Mistral, Qwen2/3); "
                            "generic = the transformers forward with a dynamic cache; auto = lean where supported")
    prefill_chunk: int = Field(256, ge=1, description="lean engine: prompt tokens prefilled between two decode steps")
    prefix_cache_tokens: int = Field(1024, ge=0, description="lean engine: prompt tokens whose keys/values are kept "
                                                             "for reuse by prompts with the same head (0 = off)")
    max_queue: int = Field(256, ge=1, description="waiting requests before new ones get HTTP 429")
    max_context: int | None = Field(None, ge=8, description="prompt + completion tokens (default: the model's maximum)")
    max_tokens_default: int = Field(256, ge=1, description="completion tokens when a request does not say")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all cores)")
    keys_file: str | None = Field(None, description="API key store (default: $HOMEFORGE_HOME/api_keys.json, ~/.homeforge)")
    require_keys: bool | None = Field(None, description="require an API key (default: when any key exists)")
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS (empty = CORS off)")
    audit_file: str | None = Field(None, description="per-request audit log, JSONL (default: $HOMEFORGE_HOME/audit/serve.jsonl)")
    audit_text: bool = Field(False, description="also log prompt and completion text, PII-scrubbed")
    graceful_timeout: float = Field(30.0, ge=0, description="seconds to finish in-flight requests on shutdown")
    upstreams: list[UpstreamConfig] = Field(default_factory=list, description="gateway mode: OpenAI-compatible "
                                            "servers to put behind homeforge (URLs or {url, key_file, model})")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    grpc_port: int | None = Field(None, ge=0, le=65535, description="also serve gRPC on this port (same host, keys "
                                  "and audit; 0 = any free port; default: off)")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    ab: AbConfig = Field(default_factory=AbConfig)

    @field_validator("upstreams", mode="before")
    @classmethod
    def _urls(cls, v):
        """A plain URL stands for ``{url: URL}``."""
        if isinstance(v, (str, dict)):
            v = [v]
        return [{"url": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

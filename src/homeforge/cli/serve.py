"""`homeforge serve`, `homeforge chat` and the API keys (`homeforge keys add/list/revoke`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from homeforge.cli._common import ConfigFile, Overrides, app, console, keys_app, load
from homeforge.errors import HomeforgeError


@app.command()
def serve(
    ctx: typer.Context,
    model_dir: Annotated[Path | None, typer.Argument(
        help="local model directory to serve, or registry:NAME@ALIAS (follows the alias: a promotion or "
             "rollback is swapped in without downtime); in gateway mode optional: its tokenizer counts tokens, its "
             "name is the model id", show_default=False)] = None,
    overrides: Overrides = None,
    config: ConfigFile = None,
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1; others need API keys)")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8000)")] = None,
    backend: Annotated[str | None, typer.Option(help="auto (default: onnx for an ONNX export, else torch), torch, "
                                                     "onnx, or vllm (starts `vllm serve` behind the gateway)")] = None,
    model_name: Annotated[str | None, typer.Option(help="model id clients use (default: directory name)")] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=1, help="sequences decoded together")] = None,
    keys_file: Annotated[Path | None, typer.Option(help="API key store (default ~/.homeforge/api_keys.json)")] = None,
    upstream: Annotated[list[str] | None, typer.Option(
        help="gateway mode: an OpenAI-compatible server to put behind homeforge (repeat for several); "
             "non-loopback hosts must be allowed with HOMEFORGE_ALLOW_HOSTS", show_default=False)] = None,
    upstream_key_file: Annotated[Path | None, typer.Option(help="file with the bearer key the upstreams expect")] = None,
    upstream_key_env: Annotated[str | None, typer.Option(help="environment variable with that key")] = None,
    grpc_port: Annotated[int | None, typer.Option(min=0, max=65535, help="also serve gRPC on this port (same host, "
                                                  "keys and audit; 0 = any free port; default: off)")] = None,
) -> None:
    """Serve a model with an OpenAI-compatible API: continuous batching, streaming, keys, metrics, audit.

    Routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings,
    /v1/classifications (classifier models), /health, /ready, /metrics, /openapi.json, /admin/reload.
    With API keys present (`homeforge keys add`), every route but /health and /ready needs
    `Authorization: Bearer KEY`. A non-loopback --host is refused without keys.
    Ctrl-C / SIGTERM finishes the requests in flight, then exits.

    Gateway mode (--upstream URL, or --backend vllm): the same API, keys, limits, audit and
    metrics in front of other OpenAI-compatible servers (vLLM, llama.cpp's llama-server, TGI,
    homeforge), balanced by least requests in flight, health-checked, with failover.

    Examples:

        homeforge serve homeforge-runs/quickstart/model
        homeforge serve MODEL --port 9000 max_batch_size=32 threads=2
        homeforge keys add --name app --role user && homeforge serve MODEL --host 0.0.0.0
        homeforge serve MODEL --grpc-port 50051
        homeforge serve registry:docs@champion       # follows promotions and rollbacks (docs/pipeline.md)
        homeforge serve --upstream http://127.0.0.1:8001 --upstream http://127.0.0.1:8002
        HOMEFORGE_ALLOW_HOSTS=10.0.0.5 homeforge serve --upstream http://10.0.0.5:8000 --upstream-key-env VLLM_KEY
        homeforge serve MODEL --backend vllm gateway.extra_args='[--tensor-parallel-size, "2"]'
        curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "Hello", "max_tokens": 20}'
    """
    from homeforge.config import ServeConfig
    from homeforge.serve.app import serve as run_server

    if model_dir is not None and "=" in str(model_dir) and not model_dir.exists():  # `serve --upstream URL key=value`
        overrides, model_dir = [str(model_dir), *(overrides or [])], None
    cfg = load(ctx, ServeConfig, config, overrides, model_dir=None if model_dir is None else str(model_dir), host=host,
               port=port, backend=backend, model_name=model_name, max_batch_size=max_batch_size, keys_file=keys_file,
               upstreams=upstream or None, gateway__key_file=upstream_key_file, gateway__key_env=upstream_key_env,
               grpc_port=grpc_port)
    from homeforge.serve.app import gateway_mode

    if not cfg.model_dir and not gateway_mode(cfg):
        raise HomeforgeError("nothing to serve: give a MODEL_DIR, or --upstream URL for gateway mode",
                             fix="e.g. `homeforge serve homeforge-runs/quickstart/model` or "
                                 "`homeforge serve --upstream http://127.0.0.1:8001`")
    run_server(cfg, console=console)


@app.command()
def chat(
    model_dir: Annotated[Path | None, typer.Argument(help="local model directory (omit with --url)")] = None,
    url: Annotated[str | None, typer.Option(help="chat with a running server instead, e.g. http://127.0.0.1:8000")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", "-k", envvar="HOMEFORGE_API_KEY",
                                                help="API key for --url")] = None,
    model: Annotated[str | None, typer.Option(help="model id on the server (default: its first model)")] = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="tokens per answer at most")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0, help="0 = greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="nucleus sampling mass")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="seed for sampling")] = None,
) -> None:
    """Chat with a model in the terminal, streaming tokens as they are generated.

    Runs the model in this process (same engine as `homeforge serve`), or talks to a
    running server with --url. Type /reset to clear the conversation, /exit or Ctrl-D to quit.

    Examples:

        homeforge chat homeforge-runs/sft/model
        homeforge chat MODEL --temperature 0 --system "Answer in one sentence."
        homeforge chat --url http://127.0.0.1:8000 --api-key hfk_...
    """
    from homeforge.serve.chat import LocalChat, RemoteChat, repl

    if (model_dir is None) == (url is None):
        raise HomeforgeError("give either a MODEL_DIR or --url, not both or neither",
                             fix="e.g. `homeforge chat MODEL_DIR` or `homeforge chat --url http://127.0.0.1:8000`")
    backend = RemoteChat(url, api_key, model) if url else LocalChat(str(model_dir))
    try:
        repl(backend, console, system, max_tokens, temperature, top_p, seed)
    finally:
        backend.close()


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Option(help="a name for the key (who or what uses it)")],
    role: Annotated[str, typer.Option(help="admin (everything), user (inference), metrics (/metrics only); for `homeforge ui` also operator (inference, runs, promotions) or viewer (read-only pages)")] = "user",
    rpm: Annotated[int | None, typer.Option(min=1, help="requests per minute allowed (default: no limit)")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="tokens per minute allowed (default: no limit)")] = None,
    keys_file: Annotated[Path | None, typer.Option(help="API key store (default ~/.homeforge/api_keys.json)")] = None,
) -> None:
    """Create an API key for `homeforge serve`. The key is printed once; only its hash is stored.

    Examples:

        homeforge keys add --name frontend --role user --rpm 60 --tpm 20000
        homeforge keys add --name grafana --role metrics
        homeforge keys add --name ops --role admin
    """
    from homeforge.serve.auth import KeyStore

    store = KeyStore.open(keys_file)
    key, token = store.add(name, role, rpm, tpm)
    console.print(f"created key [bold]{key.id}[/] ({key.name}, role {key.role}) in {store.path}", highlight=False)
    console.print("the key (shown only now; store it safely):", highlight=False)
    sys.stdout.write(token + "\n")


@keys_app.command("list")
def keys_list(
    keys_file: Annotated[Path | None, typer.Option(help="API key store (default ~/.homeforge/api_keys.json)")] = None,
    all_keys: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False,
) -> None:
    """List API keys (id, name, role, limits, created, revoked); never the keys themselves.

    Examples:

        homeforge keys list
        homeforge keys list --all
    """
    from homeforge.serve.auth import KeyStore

    store = KeyStore.open(keys_file)
    table = Table(title=f"API keys in {store.path}")
    for col in ("id", "name", "role", "req/min", "tok/min", "created", "revoked"):
        table.add_column(col)
    for k in store.keys.values():
        if k.revoked and not all_keys:
            continue
        table.add_row(k.id, k.name, k.role, str(k.requests_per_minute or "-"), str(k.tokens_per_minute or "-"),
                      k.created, k.revoked or "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="key id or name")],
    keys_file: Annotated[Path | None, typer.Option(help="API key store (default ~/.homeforge/api_keys.json)")] = None,
) -> None:
    """Revoke an API key; a running server refuses it from its next request on.

    Examples:

        homeforge keys revoke frontend
        homeforge keys revoke 3fa2c1d9
    """
    from homeforge.serve.auth import KeyStore

    k = KeyStore.open(keys_file).revoke(key)
    console.print(f"revoked key {k.id} ({k.name})", highlight=False)

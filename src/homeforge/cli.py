"""The `homeforge` command: one thin function per command; work lives in the modules."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from homeforge import __version__
from homeforge.errors import HomeforgeError

app = typer.Typer(
    name="homeforge",
    help="From a folder of private documents to an evaluated, compressed, served model, fully offline.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect stage configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")
keys_app = typer.Typer(help="API keys for `homeforge serve` (and data-encryption keys).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # a message is never split mid-phrase

Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="config overrides as KEY.SUB=VALUE (e.g. train.optim.lr=3e-4)", show_default=False),
]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file", show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="re-run even if an up-to-date artifact exists; replace it")]


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"homeforge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="print the version and exit")] = False,
    encrypt: Annotated[bool, typer.Option("--encrypt", help="encrypt the data files this command writes "
                                          "(needs a data key: `homeforge keys init`)")] = False,
) -> None:
    """Set the offline switches and the egress guard before any command runs."""
    from homeforge.security import audit, egress

    if encrypt:
        from homeforge.security import keys

        keys.load_key(required=True)  # no key: fail now, before anything is written (in the clear or not)
        os.environ["HOMEFORGE_ENCRYPT"] = "1"

    egress.set_offline_env()
    if os.environ.get("HOMEFORGE_ALLOW_NETWORK") != "1":
        egress.install(on_refuse=audit.egress_refused)


# --------------------------------------------------------------------------- quickstart


@app.command()
def quickstart(
    overrides: Overrides = None,
    config: ConfigFile = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output directory")] = None,
    max_steps: Annotated[int | None, typer.Option(help="upper bound on optimizer steps")] = None,
    minutes: Annotated[float | None, typer.Option(help="training time budget in minutes (default 6)")] = None,
    preset: Annotated[str | None, typer.Option(help="model preset: debug, tiny, small, 124m")] = None,
    force: Force = False,
) -> None:
    """Train a small model from text already on this machine, evaluate it and show samples.

    Builds a corpus from the docstrings of Python's standard library, trains a byte-level
    BPE tokenizer and a small Llama-architecture model on the CPU (about 7 minutes on 2
    cores by default), compares validation perplexity with a unigram baseline and saves a
    Hugging Face model directory.

    Examples:

        homeforge quickstart
        homeforge quickstart --minutes 2 --output runs/qs
        homeforge quickstart --preset debug --max-steps 50 train.seq_len=128
    """
    from homeforge import quickstart as qs
    from homeforge.config import QuickstartConfig, load_config

    extra = list(overrides or [])
    if output is not None:
        extra.append(f"output_dir={output}")
    if max_steps is not None:
        extra += [f"train.max_steps={max_steps}", *([] if minutes is not None else ["train.max_minutes=null"])]
    if minutes is not None:
        extra.append(f"train.max_minutes={minutes}")
    if preset is not None:
        extra.append(f"train.model.preset={preset}")
    cfg = load_config(QuickstartConfig, config, extra)
    qs.run(cfg, force=force, console=console)


# --------------------------------------------------------------------------- generate


@app.command()
def generate(
    model_dir: Annotated[Path, typer.Argument(help="local model directory")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="prompt text (repeatable)")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate")] = 50,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy; > 0 samples")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="nucleus sampling mass")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="sample from the k most likely tokens (0 = off)")] = 0,
    seed: Annotated[int | None, typer.Option(help="seed for sampling")] = None,
    chat: Annotated[bool, typer.Option(help="wrap the prompt in the model's chat template")] = False,
) -> None:
    """Generate text from a local model directory (greedy by default).

    Examples:

        homeforge generate homeforge-runs/quickstart/model --prompt "Return the number of"
        homeforge generate MODEL --prompt "Hello" --temperature 0.8 --top-p 0.95 --seed 1
    """
    from homeforge.models.generate import generate_text
    from homeforge.models.io import load_causal_lm

    model, tok = load_causal_lm(model_dir)
    for p in prompt:
        text = generate_text(model, tok, p, max_new_tokens, temperature, top_p, top_k, seed, chat=chat)
        console.print(f"[bold]{p}[/]{text}", highlight=False)


# --------------------------------------------------------------------------- doctor


@app.command()
def doctor(
    path: Annotated[Path, typer.Option(help="where runs will be written (for the free-disk check)")] = Path("."),
) -> None:
    """Show what this machine is and can do: CPU, memory, GPU, versions, disk, network guard.

    Examples:

        homeforge doctor
        homeforge doctor --path /data/runs
    """
    from homeforge.doctor import checks

    table = Table(title=f"homeforge {__version__} doctor")
    for col in ("check", "value", "status", "fix"):
        table.add_column(col)
    colours = {"ok": "green", "warn": "yellow", "fail": "red"}
    failed = False
    for name, value, status, fix in checks(str(path)):
        failed |= status == "fail"
        table.add_row(name, value, f"[{colours[status]}]{status}[/]", fix)
    console.print(table)
    if failed:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- config


@config_app.command("show")
def config_show(
    stage: Annotated[str, typer.Argument(help="stage name, e.g. quickstart, train")],
    yaml_out: Annotated[bool, typer.Option("--yaml", help="print the defaults as a YAML file to copy")] = False,
) -> None:
    """Print a stage's settings with defaults and descriptions.

    Examples:

        homeforge config show quickstart
        homeforge config show train --yaml > train.yaml
    """
    from homeforge.config import STAGES, describe, to_yaml

    if stage not in STAGES:
        raise HomeforgeError(f"unknown stage {stage!r}", fix=f"choose one of: {', '.join(sorted(STAGES))}")
    schema = STAGES[stage]
    if yaml_out:
        sys.stdout.write(to_yaml(schema()))
        return
    table = Table(title=f"{stage}: {(schema.__doc__ or '').strip().splitlines()[0]}")
    table.add_column("key")
    table.add_column("default")
    table.add_column("description")
    for key, default, desc in describe(schema):
        table.add_row(key, default, desc)
    console.print(table)


# --------------------------------------------------------------------------- export


@app.command()
def export(
    model_dir: Annotated[Path, typer.Argument(help="local model directory (or a LoRA adapter directory)")],
    format: Annotated[str | None, typer.Option("--format", "-f", help="hf, onnx or gguf (default hf)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output directory (default MODEL_DIR-FORMAT)")] = None,
    outtype: Annotated[str | None, typer.Option(help="gguf: f32, f16 or q8_0 (default q8_0)")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="onnx: also write an ONNX Runtime dynamic int8 model")] = False,
    base: Annotated[Path | None, typer.Option(help="base model directory of a LoRA adapter")] = None,
    overrides: Overrides = None,
    config: ConfigFile = None,
    force: Force = False,
) -> None:
    """Export a model to HF (safetensors), ONNX (ONNX Runtime) or GGUF (llama.cpp, Ollama).

    A LoRA adapter is merged into its base. Every export is checked against the PyTorch
    model (logits on fixed texts) and the result is written into the manifest
    (homeforge.json); an export that fails the check is not written.

    Examples:

        homeforge export runs/model --format hf
        homeforge export runs/lora-adapter --format hf --base runs/model
        homeforge export runs/model --format onnx --int8
        homeforge export runs/model --format gguf --outtype q8_0 -o runs/model-gguf
        homeforge export runs/model --format onnx onnx.kv_cache=false onnx.optimize=basic
    """
    from homeforge.config import ExportConfig, load_config
    from homeforge.export import run_export

    extra = [*([f"format={format}"] if format else []), *(overrides or [])]
    if outtype is not None:
        extra.append(f"gguf.outtype={outtype}")
    if int8:
        extra.append("onnx.int8=true")
    if base is not None:
        extra.append(f"base_model={base}")
    cfg = load_config(ExportConfig, config, extra)
    run_export(model_dir, output, cfg, force=force, console=console)


# --------------------------------------------------------------------------- import


@app.command("import")
def import_gguf(
    gguf_file: Annotated[Path, typer.Argument(help="a .gguf file (llama.cpp / Ollama)")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output model directory (default: beside the file)")] = None,
    overrides: Overrides = None,
    config: ConfigFile = None,
    force: Force = False,
) -> None:
    """Import a GGUF model into a Hugging Face model directory (to fine-tune or evaluate it).

    The tensors are dequantized to fp32 (or dtype=float16/bfloat16), the tokenizer and
    chat template are rebuilt from the GGUF metadata, and the written directory is
    checked against the GGUF-loaded model.

    Examples:

        homeforge import SmolLM2-135M-Instruct.Q4_1.gguf -o models/smollm2
        homeforge import runs/model-gguf/model-q8_0.gguf -o runs/reimported dtype=bfloat16
    """
    from homeforge.config import ImportConfig, load_config
    from homeforge.export.importer import import_gguf as run_import

    cfg = load_config(ImportConfig, config, list(overrides or []))
    run_import(gguf_file, output, cfg, force=force, console=console)


# --------------------------------------------------------------------------- serve


@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="local model directory to serve")],
    overrides: Overrides = None,
    config: ConfigFile = None,
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1; others need API keys)")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8000)")] = None,
    backend: Annotated[str | None, typer.Option(help="auto (default: onnx for an ONNX export, else torch), torch, onnx or vllm")] = None,
    model_name: Annotated[str | None, typer.Option(help="model id clients use (default: directory name)")] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=1, help="sequences decoded together")] = None,
    keys_file: Annotated[Path | None, typer.Option(help="API key store (default ~/.homeforge/api_keys.json)")] = None,
) -> None:
    """Serve a model with an OpenAI-compatible API: continuous batching, streaming, keys, metrics, audit.

    Routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings,
    /v1/classifications (classifier models), /health, /ready, /metrics, /admin/reload.
    With API keys present (`homeforge keys add`), every route but /health and /ready needs
    `Authorization: Bearer KEY`. A non-loopback --host is refused without keys.
    Ctrl-C / SIGTERM finishes the requests in flight, then exits.

    Examples:

        homeforge serve homeforge-runs/quickstart/model
        homeforge serve MODEL --port 9000 max_batch_size=32 threads=2
        homeforge keys add --name app --role user && homeforge serve MODEL --host 0.0.0.0
        curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{"prompt": "Hello", "max_tokens": 20}'
    """
    from homeforge.config import ServeConfig, load_config
    from homeforge.serve.app import serve as run_server

    extra = [f"model_dir={model_dir}", *(overrides or [])]
    for key, value in (("host", host), ("port", port), ("backend", backend), ("model_name", model_name),
                       ("max_batch_size", max_batch_size), ("keys_file", keys_file)):
        if value is not None:
            extra.append(f"{key}={value}")
    cfg = load_config(ServeConfig, config, extra)
    run_server(cfg, console=console)


# --------------------------------------------------------------------------- chat


@app.command()
def chat(
    model_dir: Annotated[Path | None, typer.Argument(help="local model directory (omit with --url)")] = None,
    url: Annotated[str | None, typer.Option(help="chat with a running server instead, e.g. http://127.0.0.1:8000")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="HOMEFORGE_API_KEY", help="API key for --url")] = None,
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


# --------------------------------------------------------------------------- keys (API keys)


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Option(help="a name for the key (who or what uses it)")],
    role: Annotated[str, typer.Option(help="admin (everything), user (inference) or metrics (/metrics only)")] = "user",
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


# --------------------------------------------------------------------------- prepare


@app.command()
def prepare(
    args: Annotated[
        list[str] | None,
        typer.Argument(help="input files, folders or globs, then optional KEY.SUB=VALUE config overrides", show_default=False),
    ] = None,
    config: ConfigFile = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="dataset artifact directory")] = None,
    kind: Annotated[str | None, typer.Option(help="dataset kind: text, chat or classification")] = None,
    tokenizer_from: Annotated[Path | None, typer.Option("--tokenizer-from", help="use this model directory's tokenizer")] = None,
    check_only: Annotated[bool, typer.Option("--check-only", help="print the quality report; write no dataset")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="stop at the first bad line or file (naming it)")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="worker processes (default: CPU cores)")] = None,
    force: Force = False,
) -> None:
    """Turn a folder of raw files into a clean, deduplicated, PII-scrubbed, tokenized dataset.

    Reads .txt .md .html .jsonl .json .csv .tsv .parquet .pdf .docx; cleans and filters
    the text, removes exact and near duplicates (MinHash LSH), replaces personal data
    (e-mail, phones, PRC IDs, bank cards, IPs, credentials in URLs, your own patterns
    and names), splits by content hash, trains a byte-level BPE (or uses a model's
    tokenizer) and writes token shards, the cleaned records and a quality report
    (report.md, report.json, PNG plots). Every dropped record is counted by reason.

    Examples:

        homeforge prepare docs/ -o data/docs
        homeforge prepare 'notes/**/*.md' reports.pdf --check-only
        homeforge prepare chats.jsonl --kind chat --tokenizer-from models/base -o data/sft
        homeforge prepare tickets.csv --kind classification fields.text=body fields.label=team -o data/tickets
        homeforge prepare docs/ -o data/docs pii.mode=pseudonym dedup.threshold=0.7 split.val=0.1
    """
    from homeforge.config import PrepareConfig, load_config
    from homeforge.data.prepare import run

    inputs, extra = [], []
    for a in args or []:
        key = a.split("=", 1)[0]
        if "=" in a and not os.path.exists(a) and "/" not in key and "*" not in key:
            extra.append(a)
        else:
            inputs.append(a)
    if inputs:
        extra.append("inputs=" + json.dumps(inputs))
    if output is not None:
        extra.append(f"output_dir={json.dumps(str(output))}")
    if kind is not None:
        extra.append(f"kind={kind}")
    if tokenizer_from is not None:
        extra.append(f"tokenizer.from_dir={json.dumps(str(tokenizer_from))}")
    if strict:
        extra.append("strict=true")
    if workers is not None:
        extra.append(f"workers={workers}")
    cfg = load_config(PrepareConfig, config, extra)
    run(cfg, force=force, check_only=check_only, console=console)


# --------------------------------------------------------------------------- eval


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="local model directory (causal LM or sequence classifier)")],
    data: Annotated[Path, typer.Option("--data", "-d", help="dataset artifact (made by `homeforge prepare`)")],
    overrides: Overrides = None,
    baseline: Annotated[Path | None, typer.Option("--baseline", "-b", help="model to compare against (paired tests)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="report directory (default MODEL_DIR-eval)")] = None,
    split: Annotated[str | None, typer.Option(help="dataset split (default val)")] = None,
    config: ConfigFile = None,
    force: Force = False,
) -> None:
    """Evaluate a model on a dataset: perplexity, generation metrics and speed, or classifier metrics.

    Also robustness under seeded typos, paired significance tests against a baseline, and
    quality gates (exit code 3 when one fails); writes eval.json, eval.md and PNG plots.

    Examples:

        homeforge eval runs/qs/model --data runs/qs/data
        homeforge eval runs/sft/model --data data/sft --baseline runs/base/model gates.max_regression=0.02
        homeforge eval runs/cls/model --data data/tickets gates.min_accuracy=0.9 robustness.enabled=false
        homeforge eval runs/qs/model-int8-dynamic --data runs/qs/data gates.max_ppl=40
    """
    from homeforge.config import EvalConfig, load_config
    from homeforge.evaluate.run import run

    extra = list(overrides or [])
    if split is not None:
        extra.append(f"split={split}")
    cfg = load_config(EvalConfig, config, extra)
    run(model_dir, data, cfg, baseline, output, force, console)


# --------------------------------------------------------------------------- compress


@app.command()
def compress(
    model_dir: Annotated[Path, typer.Argument(help="local model directory (causal LM or classifier)")],
    method: Annotated[str | None, typer.Option("--method", "-m", help="int8-dynamic, int8-weight-only, "
                                               "int4-weight-only, qat, distill, prune")] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="text dataset artifact for the quality gate "
                                              "(and training for qat/distill)")] = None,
    overrides: Overrides = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output model directory "
                                                "(default MODEL_DIR-METHOD)")] = None,
    config: ConfigFile = None,
    force: Annotated[bool, typer.Option("--force", help="write even if the quality gate fails; replace an "
                                        "existing output")] = False,
) -> None:
    """Compress a model into a new model directory: int8/int4 quantization, QAT, distillation or pruning.

    Prints a before/after table (size on disk, latency at batch 1 and 8, perplexity) and
    refuses to write a model that fails the quality gate unless --force.

    Examples:

        homeforge compress runs/qs/model --method int8-dynamic --data runs/qs/data
        homeforge compress runs/qs/model -m int4-weight-only -d runs/qs/data group_size=32 gates.max_ppl_increase=0.1
        homeforge compress runs/qs/model -m prune -d runs/qs/data prune.kind=structured prune.mlp_keep=0.5
        homeforge compress runs/qs/model -m distill -d runs/qs/data distill.student_preset=debug distill.steps=500
        homeforge compress runs/qs/model -m qat -d runs/qs/data qat.steps=100
    """
    from homeforge.compress.run import run
    from homeforge.config import CompressConfig, load_config

    extra = list(overrides or [])
    if method is not None:
        extra.append(f"method={method}")
    cfg = load_config(CompressConfig, config, extra)
    run(model_dir, data, cfg, output, force, console)


# --------------------------------------------------------------------------- train


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


@app.command()
def train(
    overrides: Overrides = None,
    config: ConfigFile = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="dataset directory (from `homeforge prepare`)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="run directory (checkpoints, metrics, model/)")] = None,
    method: Annotated[str | None, typer.Option(help="pretrain, sft, lora or classify")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="continue a run: 'latest' or a checkpoint directory",
                                               show_default=False)] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="processes on this machine (launches torchrun)")] = 1,
    force: Annotated[bool, typer.Option("--force", help="delete the run directory's old checkpoints and start over")] = False,
) -> None:
    """Train a model (pretrain, SFT, LoRA, classifier) on a prepared dataset; stop and resume at any step.

    Writes checkpoints every `checkpoint.every` steps and at the best validation loss,
    metrics.jsonl, TensorBoard events (and MLflow with `tracking.mlflow=true`), loss.png
    and the final Hugging Face model in OUTPUT/model. `--nproc N` runs N processes with
    torchrun (DDP, or FSDP2 with `distributed.strategy=fsdp`); for several machines run
    `torchrun --nnodes ... -m homeforge train ...` yourself.

    Examples:

        homeforge train --data runs/data --output runs/pre model.preset=tiny max_steps=2000
        homeforge train --config examples/lora-smollm2.yaml --output runs/lora
        homeforge train --output runs/pre --resume latest
        homeforge train --config pre.yaml --nproc 2 distributed.strategy=fsdp
    """
    from homeforge.config import TrainConfig, load_config

    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from homeforge.train.distributed import launch

        code = launch(nproc, _without_nproc(sys.argv[1:]))
        if code:
            err_console.print(f"[bold red]error:[/] torchrun exited with code {code} (see the messages above)")
        raise typer.Exit(code)
    extra = list(overrides or [])
    for key, value in (("data", data), ("output_dir", output), ("method", method)):
        if value is not None:
            extra.append(f"{key}={value}")
    base = None
    if resume is not None and config is None:  # continue with the checkpoint's own config (+ overrides)
        from homeforge.train.checkpoint import read_config, resolve_resume

        run_dir = output if output is not None else Path(TrainConfig().output_dir)
        base = read_config(resolve_resume(run_dir, resume))
    cfg = load_config(TrainConfig, config, extra, base=base)
    from homeforge.train.run import run

    run(cfg, resume=resume, force=force, console=console)


# --------------------------------------------------------------------------- security (data keys, audit, verify)


audit_app = typer.Typer(help="The tamper-evident audit log: verify, show, prune.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@keys_app.command("init")
def keys_init(
    key_file: Annotated[Path | None, typer.Option(help="where to write it (default $HOMEFORGE_KEY_FILE or "
                                                       "~/.homeforge/keys/data.key)")] = None,
) -> None:
    """Create the data-encryption key (256-bit, in a file only you can read). Never overwrites one.

    Encrypted artifacts need this key to be read: back it up somewhere safe (offline).
    With a KMS, skip this and set HOMEFORGE_KEY_COMMAND to a command that prints the key.

    Examples:

        homeforge keys init
        homeforge keys init --key-file /secure/homeforge.key
        HOMEFORGE_KEY_FILE=/secure/homeforge.key homeforge --encrypt prepare docs/ -o data
    """
    from homeforge.security import keys

    k = keys.init_key(key_file)
    console.print(f"created data key [bold]{k.key_id}[/] in {k.source} (mode 600)", highlight=False)
    a = keys.init_audit_key()
    if a is not None:
        console.print(f"created audit-log signing key {a.key_id} in {a.source} (mode 600)", highlight=False)
    console.print("back it up offline: without it, encrypted artifacts cannot be read", highlight=False)


@keys_app.command("status")
def keys_status(
    force: Annotated[bool, typer.Option("--force", help="accept a key file other users can read")] = False,
) -> None:
    """Show which data key is configured (its id and source, never the key).

    Examples:

        homeforge keys status
    """
    from homeforge.security import keys

    k = keys.load_key(required=True, force=force)
    console.print(f"data key {k.key_id} from {k.source}", highlight=False)


@keys_app.command("rotate")
def keys_rotate(
    artifacts_: Annotated[list[Path], typer.Argument(metavar="ARTIFACT...",
                                                     help="artifact directories (or folders holding them) to re-encrypt")],
    force: Annotated[bool, typer.Option("--force", help="accept a key file other users can read")] = False,
    keep_old: Annotated[bool, typer.Option(help="keep the old key file as data.key.retired-ID (default: destroy it)")] = False,
) -> None:
    """Re-encrypt artifacts under a new data key, each atomically; then retire the old key.

    The new key comes from HOMEFORGE_NEW_KEY (64 hex chars) or is generated. With a key
    file, the new key replaces it once every artifact is re-encrypted; an interrupted
    rotation can be re-run (the pending key is kept in data.key.new). With
    HOMEFORGE_KEY/HOMEFORGE_KEY_COMMAND, give the new key in HOMEFORGE_NEW_KEY and update
    your KMS afterwards.

    Examples:

        homeforge keys rotate homeforge-runs/
        homeforge keys rotate data/clinic model/clinic-lora
    """
    from homeforge.security import keys, storage

    old = keys.load_key(required=True, force=force)
    file_key = old.source not in ("env", "command")
    pending = Path(old.source).with_name(Path(old.source).name + ".new") if file_key else None
    if os.environ.get("HOMEFORGE_NEW_KEY"):
        secret = keys._decode(os.environ["HOMEFORGE_NEW_KEY"], "HOMEFORGE_NEW_KEY")
        new = keys.DataKey(secret, keys.key_id(secret), "env")
        if pending is not None:
            new = keys.write_key_file(pending, secret, replace=True)
    elif pending is not None and pending.is_file():
        new = keys.read_key_file(pending)
        console.print(f"resuming an interrupted rotation to key {new.key_id}", highlight=False)
    elif pending is not None:
        new = keys.init_key(pending)
    else:
        raise HomeforgeError("the data key comes from HOMEFORGE_KEY/HOMEFORGE_KEY_COMMAND: give the new key too",
                             fix="set HOMEFORGE_NEW_KEY to the new key (64 hex characters) from your KMS")
    if new.key_id == old.key_id:
        raise HomeforgeError("the new key is the same as the current one", fix="give a different HOMEFORGE_NEW_KEY")
    found = sorted({a for root in artifacts_ for a in storage.find_encrypted_artifacts(root)})
    for root in artifacts_:
        if not root.exists():
            raise HomeforgeError(f"{root} does not exist", fix="pass artifact directories or folders holding them")
    total = 0
    for art in found:
        n = storage.rotate_artifact(art, old, new)
        total += n
        console.print(f"{art}: {n} files re-encrypted under {new.key_id}", highlight=False)
    for root in artifacts_:  # checkpoints, logs and other encrypted files outside artifacts
        n = storage.rotate_loose_files(root, old, new, skip=found)
        total += n
        if n:
            console.print(f"{root}: {n} other encrypted files (checkpoints, logs) re-encrypted", highlight=False)
    if pending is not None:
        current = Path(old.source)
        if keep_old:
            retired = current.with_name(f"{current.name}.retired-{old.key_id}")
            os.replace(current, retired)
            console.print(f"old key kept in {retired}", highlight=False)
        old_copy = current.with_name(f"{current.name}.destroy-{old.key_id}")
        if not keep_old:
            old_copy.unlink(missing_ok=True)
            os.link(current, old_copy)  # a second name for the old key's bytes, to overwrite them below
        os.replace(pending, current)  # atomic: data.key is the old key or the new one, never missing
        if not keep_old:
            from homeforge.security.keys import destroy_key_file

            destroy_key_file(old_copy)
            console.print(f"old key {old.key_id} overwritten and deleted", highlight=False)
    console.print(f"rotated {len(found)} artifacts ({total} files) from key {old.key_id} to {new.key_id}",
                  highlight=False)


@audit_app.command("verify")
def audit_verify(
    log: Annotated[Path | None, typer.Option(help="audit log (default $HOMEFORGE_AUDIT_LOG or ~/.homeforge/audit/audit.jsonl)")] = None,
) -> None:
    """Check the audit log's hash chain (and HMAC signatures if a data key is set); name the first bad line.

    Exit code 0 = intact, 1 = tampered (edited, deleted, inserted or reordered lines).

    Examples:

        homeforge audit verify
        homeforge audit verify --log /var/log/homeforge/audit.jsonl
    """
    from homeforge.security import audit

    res = audit.verify(log)
    (console if res.ok else err_console).print(res.summary(), highlight=False)
    if not res.ok:
        raise typer.Exit(1)


@audit_app.command("show")
def audit_show(
    log: Annotated[Path | None, typer.Option(help="audit log (default ~/.homeforge/audit/audit.jsonl)")] = None,
    since: Annotated[str | None, typer.Option(help="from this time (ISO 8601, e.g. 2026-11-01 or 2026-11-01T08:00Z)")] = None,
    until: Annotated[str | None, typer.Option(help="up to this time (ISO 8601)")] = None,
    user: Annotated[str | None, typer.Option(help="only this OS user")] = None,
    command: Annotated[str | None, typer.Option(help="only commands containing this (e.g. train)")] = None,
    artifact: Annotated[str | None, typer.Option(help="only lines naming this artifact path or hash (part)")] = None,
    event: Annotated[str | None, typer.Option(help="only this event: command, egress-refused, request, ...")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the JSON lines")] = False,
) -> None:
    """Show audit log lines, filtered by time, user, command, artifact or event.

    Examples:

        homeforge audit show --since 2026-11-01 --command train
        homeforge audit show --user alice --artifact data/clinic
        homeforge audit show --event egress-refused --json
    """
    import json as _json

    from homeforge.security import audit

    try:
        rows = audit.show(log, since=since, until=until, user=user, command=command, artifact=artifact, event=event)
    except ValueError as exc:
        raise HomeforgeError(f"cannot read the time filter: {exc}", fix="use ISO 8601, e.g. 2026-11-01T08:00:00Z") from None
    if as_json:
        for r in rows:
            sys.stdout.write(_json.dumps(r) + "\n")
        return
    table = Table(title=f"{len(rows)} audit lines")
    for col in ("seq", "time", "user", "event", "command / detail", "outcome"):
        table.add_column(col)
    for r in rows:
        detail = " ".join(r.get("args", [])) if r.get("event") == "command" else (
            f"{r.get('host')}:{r.get('port')}" if r.get("event") == "egress-refused" else
            str(r.get("command") or r.get("path") or r.get("action") or ""))
        table.add_row(str(r.get("seq")), str(r.get("time")), str(r.get("user")), str(r.get("event")), detail,
                      str(r.get("outcome", r.get("status", ""))))
    console.print(table)


@audit_app.command("prune")
def audit_prune(
    log: Annotated[Path | None, typer.Option(help="audit log (default ~/.homeforge/audit/audit.jsonl)")] = None,
    keep_days: Annotated[int | None, typer.Option(min=1, help="keep this many days (default "
                                                  "$HOMEFORGE_AUDIT_RETENTION_DAYS or 183)")] = None,
) -> None:
    """Drop lines older than the retention period; a signed checkpoint keeps the chain verifiable.

    Examples:

        homeforge audit prune
        HOMEFORGE_AUDIT_RETENTION_DAYS=2555 homeforge audit prune
    """
    from homeforge.security import audit

    n = audit.prune(log, keep_days=keep_days)
    console.print(f"dropped {n} lines older than {keep_days or audit.retention_days()} days", highlight=False)


@app.command()
def verify(
    artifact: Annotated[Path, typer.Argument(help="artifact directory (dataset, model, ...)")],
    decrypt: Annotated[bool, typer.Option("--decrypt", help="also authenticate every encrypted chunk with the data key")] = False,
) -> None:
    """Re-hash an artifact and the inputs it records (recursively); exit 1 on any mismatch.

    Traces a model to the exact dataset version, config and homeforge version that made it.
    Inputs are looked for where the recorded config points; ones not on this machine are listed.

    Examples:

        homeforge verify homeforge-runs/quickstart/model
        homeforge verify runs/clinic/model && homeforge serve runs/clinic/model
        homeforge verify data/clinic --decrypt
    """
    from homeforge.security.provenance import verify_tree

    checks = verify_tree(artifact, decrypt=decrypt)
    table = Table(title=f"provenance of {artifact}")
    for col in ("", "artifact / input", "stage", "result", "made", "homeforge"):
        table.add_column(col)
    for c in checks:
        mark = "[green]ok[/]" if c.ok and not c.facts.get("missing") else ("[yellow]?[/]" if c.ok else "[red]FAIL[/]")
        table.add_row(mark, "  " * c.depth + c.artifact, c.stage or "", c.detail, str(c.facts.get("created") or ""),
                      str(c.facts.get("homeforge") or ""))
    console.print(table)
    bad = [c for c in checks if not c.ok]
    if bad:
        err_console.print(f"[bold red]{len(bad)} mismatch(es)[/]: {bad[0].detail}", highlight=False)
        raise typer.Exit(1)


# --------------------------------------------------------------------------- entry point


def main() -> None:
    from homeforge.security.audit import audited_command

    try:
        with audited_command(sys.argv[1:]):  # one audit line per command (security/audit.py)
            app()
    except HomeforgeError as exc:
        err_console.print(f"[bold red]error:[/] {exc.render()}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: nothing half-written was kept")
        sys.exit(130)

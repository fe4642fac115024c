"""`homeforge export` and `homeforge import`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from homeforge.cli._common import ConfigFile, Force, Overrides, app, console, load


@app.command()
def export(
    ctx: typer.Context,
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
    from homeforge.config import ExportConfig
    from homeforge.export import run_export

    cfg = load(ctx, ExportConfig, config, overrides, format=format, gguf__outtype=outtype, onnx__int8=int8 or None,
               base_model=base)
    from homeforge.vision.task import is_vision_model

    if is_vision_model(model_dir):  # image classifier: ONNX only
        from homeforge.errors import HomeforgeError
        from homeforge.vision.evaluate import run_export as export_image

        if cfg.format != "onnx":
            raise HomeforgeError(f"an image classifier exports to ONNX, not {cfg.format}", where=str(model_dir),
                                 fix=f"homeforge export {model_dir} --format onnx [--int8]")
        export_image(model_dir, output, cfg.onnx.int8, force, console)
        return
    run_export(model_dir, output, cfg, force=force, console=console)


@app.command("import")
def import_gguf(
    ctx: typer.Context,
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
    from homeforge.config import ImportConfig
    from homeforge.export.importer import import_gguf as run_import

    cfg = load(ctx, ImportConfig, config, overrides)
    run_import(gguf_file, output, cfg, force=force, console=console)

"""Export a model directory to HF (safetensors), ONNX or GGUF; import a GGUF back.

Every export loads the model (merging a LoRA adapter into its base), writes the format
into an artifact being built, checks the exported model's logits against the original
and only then commits the artifact, with the parity result in its manifest
(``homeforge.json`` -> ``metrics.parity``). A failed parity check leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

FORMATS = ("hf", "onnx", "gguf")


def default_output(model_dir: str | Path, fmt: str) -> Path:
    p = Path(model_dir).expanduser()
    return p.parent / f"{p.name}-{fmt}"


def run_export(model_dir: str | Path, out: str | Path | None, cfg, *, force: bool = False, console=None) -> Path:
    """Export ``model_dir`` in ``cfg.format`` into the artifact directory ``out``."""
    import torch

    with torch.no_grad():  # scoped, so the caller's grad mode is untouched
        return _run_export(model_dir, out, cfg, force=force, console=console)


def export_plan(model_dir: str | Path, out: str | Path | None, cfg, *, force: bool = False):
    """The export artifact's plan (``up_to_date``: `export` would reuse it), as ``run_export`` makes it."""
    from homeforge import artifacts
    from homeforge.export import common

    out_p = Path(out) if out is not None else default_output(model_dir, cfg.format)
    path, base, _ = common.resolve(model_dir, cfg.base_model)
    return artifacts.plan(out_p, stage=f"export-{cfg.format}", config=cfg.model_dump(mode="json"),
                          inputs=common.source_inputs(path, base), force=force, encrypt=cfg.encrypt)


def _run_export(model_dir, out, cfg, *, force: bool, console) -> Path:
    from rich.console import Console

    from homeforge.export import common

    console = console or Console(quiet=True)
    plan = export_plan(model_dir, out, cfg, force=force)
    out_abs = plan.out
    if plan.up_to_date:
        console.print(f"[green]up to date[/]: {out_abs} (use --force to export again)")
        return out_abs
    with console.status(f"loading {model_dir}"):
        src = common.load_source(model_dir, cfg.base_model)
    if cfg.format == "gguf":  # refuse unsupported architectures before any writing
        from homeforge.export.gguf import check_supported

        check_supported(src.model.config, src.tokenizer)
    with plan.write() as w:
        with w.timed("export"), console.status(f"exporting to {cfg.format} and checking parity"):
            if cfg.format == "hf":
                from homeforge.export.hf import export_hf

                metrics = export_hf(src, w.dir, cfg)
            elif cfg.format == "onnx":
                from homeforge.export.onnx import export_onnx

                metrics = export_onnx(src, w.dir, cfg, console=console)
            else:
                from homeforge.export.gguf import export_gguf

                metrics = export_gguf(src, w.dir, cfg, console=console)
        w.metrics.update(metrics)
        w.extra["kind"] = f"export-{cfg.format}"
        if src.lora:
            w.extra["lora_merged"] = src.lora
        from homeforge.models.quantized import read_quantization

        if qinfo := read_quantization(src.path):  # exported from its dequantized weights
            w.extra["source_quantization"] = {k: qinfo.get(k) for k in ("method", "group_size", "format")}
    _print_parity(console, out_abs, metrics)
    return out_abs


def _print_parity(console, out: Path, metrics: dict) -> None:
    from homeforge.export import common

    for name, res in metrics.items():
        if not (name.startswith("parity") and isinstance(res, dict) and "max_rel_error" in res):
            continue
        console.print(f"  {common.parity_line(name, res)} [green]passed[/]")
    console.print(f"[green]wrote[/] {out}")

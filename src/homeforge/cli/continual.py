"""`homeforge learn`, `homeforge monitor` and `homeforge ab report`: keep a served model learning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from homeforge.cli._common import ConfigFile, Force, Overrides, app, console, load

ab_app = typer.Typer(help="Live A/B tests of `homeforge serve` (ab.candidate): significance, promotion.",
                     no_args_is_help=True)
app.add_typer(ab_app, name="ab")


@app.command()
def learn(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="the champion: a model directory or a registry reference "
                                                "NAME or NAME@ALIAS", show_default=False)] = None,
    overrides: Overrides = None,
    config: ConfigFile = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="new data: a dataset from `homeforge prepare` "
                                              "(made with the champion's tokenizer)", show_default=False)] = None,
    docs: Annotated[list[Path] | None, typer.Option("--docs", help="new data: a folder of documents (prepared "
                                                    "here with the champion's tokenizer)", show_default=False)] = None,
    feedback: Annotated[Path | None, typer.Option("--feedback", help="new data: the feedback log of `homeforge "
                                                  "serve` (feedback.enabled=true)", show_default=False)] = None,
    old_data: Annotated[Path | None, typer.Option("--old-data", help="the champion's training dataset (default: "
                                                  "the one its manifest names)", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="run directory (the candidate is "
                                                "OUTPUT/model)", show_default=False)] = None,
    lora: Annotated[bool, typer.Option("--lora", help="train LoRA adapters instead of every weight")] = False,
    force: Force = False,
) -> None:
    """Fine-tune the champion on new data without forgetting the old: experience replay + EWC.

    A share `replay.ratio` of every batch is replayed from the champion's own training data;
    with `ewc.lam > 0` moving a weight costs in proportion to its Fisher information on the
    old data (estimated here, or the one stored with the champion). The candidate
    (OUTPUT/model) records forgetting (old held-out perplexity after - before) and gain (new
    held-out perplexity before - after) and its own Fisher; it is registered with alias
    `candidate` when the champion came from the registry (or with `name=NAME`).

    Examples:

        homeforge learn docs@champion --docs new-notes/ --output runs/learn1 ewc.lam=200
        homeforge learn runs/train/model --data runs/data-b replay.ratio=0.5 ewc.lam=200 train.max_steps=300
        homeforge learn docs --feedback ~/.homeforge/feedback min_rating=4 --lora
    """
    from homeforge.continual.learn import learn as run_learn

    cfg = load(ctx, _schema(), config, overrides, model=model, data=str(data) if data else None,
               docs=[str(d) for d in docs] if docs else None, feedback=str(feedback) if feedback else None,
               old_data=str(old_data) if old_data else None, output_dir=str(output) if output else None,
               mode="lora" if lora else None)
    res = run_learn(cfg, force=force, console=console)
    console.print(f"candidate [bold]{res['model']}[/]: old held-out ppl {res['old_ppl_before']:.2f} -> "
                  f"{res['old_ppl_after']:.2f} (forgetting {res['forgetting']:+.2f}), new held-out ppl "
                  f"{res['new_ppl_before']:.2f} -> {res['new_ppl_after']:.2f} (gain {res['gain']:+.2f})"
                  + (f"; registered {res['registered']} version {res['version']} @{res['alias']}"
                     if res.get("registered") else ""), highlight=False)


@app.command()
def monitor(
    feedback: Annotated[Path, typer.Argument(help="the feedback log folder of `homeforge serve` (feedback.enabled)")],
    model: Annotated[str, typer.Option("--model", "-m", help="the served model: a directory or a registry reference "
                                       "NAME or NAME@ALIAS")],
    overrides: Annotated[list[str] | None, typer.Argument(help="thresholds as KEY=VALUE: psi, js, mmd, ppl_ratio, "
                                                          "refusal_rate, length_ratio, p99_ms (none = off)",
                                                          show_default=False)] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="training dataset (default: the one the model's "
                                              "manifest names)", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="report folder (default FEEDBACK-monitor)",
                                                show_default=False)] = None,
    last: Annotated[int | None, typer.Option("--last", min=1, help="compare the last N exchanges (earlier ones are "
                                             "the reference for response length)", show_default=False)] = None,
    since_hours: Annotated[float | None, typer.Option("--since-hours", min=0, help="only exchanges of the last H "
                                                      "hours", show_default=False)] = None,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="also the MMD of mean-pooled hidden states")] = False,
    webhook: Annotated[str | None, typer.Option("--webhook", help="POST alerts as JSON to this loopback URL",
                                                show_default=False)] = None,
) -> None:
    """Compare recent traffic with the training data: input and output drift, latency; alert past thresholds.

    Writes OUTPUT/report.md, report.json, drift.png and metrics.prom (the figures as
    Prometheus gauges for the node exporter's textfile collector). Exit code 0 when every
    figure is within its threshold, 4 when one is not (for cron), 2 on bad input.

    Examples:

        homeforge monitor ~/.homeforge/feedback --model docs@champion --last 500
        homeforge monitor fb/ --model runs/train/model psi=0.1 p99_ms=2000 --webhook http://127.0.0.1:9099/alert
    """
    from homeforge.config import MonitorThresholds
    from homeforge.continual.learn import old_dataset_of, resolve_champion
    from homeforge.monitor.report import DriftAlert, run

    thresholds = load(None, MonitorThresholds, None, overrides)
    model_dir, _ = resolve_champion(model)
    data_dir = old_dataset_of(model_dir, str(data) if data else None)
    out = output or feedback.parent / f"{feedback.name}-monitor"
    rep = run(feedback, model_dir, data_dir, out, thresholds, last=last, since_hours=since_hours,
              embeddings=embeddings, webhook=webhook)
    f = rep["figures"]
    console.print(f"{f['exchanges']} exchanges: PSI {f['psi']:.3f}, JS {f['js']:.3f}, prompt/training ppl "
                  f"{f.get('ppl_ratio') or float('nan'):.2f}, latency P50 {f['latency_p50_ms'] or 0:.0f} ms P99 "
                  f"{f['latency_p99_ms'] or 0:.0f} ms; report {out / 'report.md'}", highlight=False)
    for a in rep["alerts"]:
        console.print(f"[bold red]ALERT[/] {a}", highlight=False)
    if rep["alerts"]:
        raise DriftAlert(f"{len(rep['alerts'])} monitoring alert(s): {'; '.join(rep['alerts'])}",
                         where=str(out / "report.json"),
                         fix="look at the report; retrain on recent data (`homeforge learn`) or adjust the thresholds")


@ab_app.command("report")
def ab_report(
    feedback: Annotated[Path, typer.Argument(help="the feedback log folder of the A/B server")],
    metric: Annotated[str, typer.Option(help="rating, corrected (share corrected), latency_ms or "
                                        "completion_tokens")] = "rating",
    alpha: Annotated[float, typer.Option(min=1e-9, max=0.5, help="significance level")] = 0.01,
    paired: Annotated[str, typer.Option(help="auto (paired when >= 10 prompts got both arms), yes or no")] = "auto",
    promote: Annotated[str | None, typer.Option("--promote", help="registry NAME: when the candidate wins, ask the "
                                                "registry to promote NAME@candidate to @champion (its gate "
                                                "decides)", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Compare the arms of a live A/B test: per-arm means and the significance of the difference.

    Paired (the same prompts answered by both arms: paired bootstrap) or unpaired
    (permutation test). Exit code 0 when the candidate is significantly better, 5 when it
    is not (for scripts), 2 on bad input. With --promote the registry's gate (`homeforge
    registry promote`) still has the last word.

    Examples:

        homeforge ab report ~/.homeforge/feedback
        homeforge ab report fb/ --metric corrected --alpha 0.05
        homeforge ab report fb/ --promote docs
    """
    from homeforge.continual.ab import report

    res = report(feedback, metric=metric, alpha=alpha, paired=paired)
    if as_json:
        _print_json(res)
    else:
        for arm, r in res["arms"].items():
            console.print(f"{arm:9s} n={r['n']:5d} mean {metric} {r['mean']:.4g}", highlight=False)
        console.print(f"{res['test']}: delta {res['delta']:+.4g}, p={res['p_value']:.4g} -> {res['verdict']}",
                      highlight=False)
    if promote and res["candidate_better"]:
        from homeforge.pipeline.spec import PromoteGates
        from homeforge.registry.store import Registry

        console.print(Registry().promote(promote, "candidate", "champion", PromoteGates())["message"],
                      highlight=False)
    if not res["candidate_better"]:
        raise typer.Exit(5)


def _schema():
    from homeforge.config import LearnConfig

    return LearnConfig


def _print_json(obj) -> None:
    console.print_json(json.dumps(obj))

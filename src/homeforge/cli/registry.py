"""`homeforge registry`: register, list, show, alias, promote, rollback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from homeforge.cli._common import app, console
from homeforge.errors import HomeforgeError

registry_app = typer.Typer(help="The model registry: versions with lineage, aliases, gated promotion, rollback.",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("register")
def register(
    model_dir: Annotated[Path, typer.Argument(help="model artifact directory (from train, compress, export)")],
    name: Annotated[str, typer.Option("--name", "-n", help="registry name")],
    eval_dir: Annotated[Path | None, typer.Option("--eval", help="its evaluation report (from `homeforge eval`): "
                                                  "the promotion gate compares these", show_default=False)] = None,
    alias: Annotated[str, typer.Option(help="alias the version gets")] = "candidate",
) -> None:
    """Add a model as an immutable, content-addressed version (the same bytes twice are one version).

    Records its lineage from the manifests: dataset, config, code versions, metrics, privacy.

    Examples:

        homeforge registry register runs/train/model --name docs --eval runs/eval
    """
    from homeforge.registry.store import Registry

    v, created = Registry().register(model_dir, name, eval_dir=eval_dir, alias=alias)
    console.print(f"{'registered' if created else 'already registered:'} {name} version {v['version']} "
                  f"({v['content_hash'][:12]}) @{alias}", highlight=False)


@registry_app.command("list")
def list_cmd(name: Annotated[str | None, typer.Argument(help="one name's versions", show_default=False)] = None) -> None:
    """List registered models, or one model's versions and aliases.

    Examples:

        homeforge registry list
        homeforge registry list docs
    """
    from homeforge.registry.store import Registry

    reg = Registry()
    table = Table(title=f"registry {reg.root}")
    if name is None:
        for col in ("name", "versions", "aliases"):
            table.add_column(col)
        for n in reg.names():
            idx = reg.index(n)
            table.add_row(n, str(len(idx["versions"])), ", ".join(f"{a}={v}" for a, v in sorted(idx["aliases"].items())))
    else:
        idx = reg.index(name)
        for col in ("version", "hash", "registered", "aliases", "eval"):
            table.add_column(col)
        for v in idx["versions"]:
            ev = v.get("eval", {}).get("metrics", {})
            table.add_row(str(v["version"]), v["content_hash"][:12], v["registered"],
                          ", ".join(reg.aliases_of(name, v["version"])),
                          ", ".join(f"{k}={val:.4g}" for k, val in ev.items() if isinstance(val, float))[:60])
    console.print(table)


@registry_app.command("show")
def show(ref: Annotated[str, typer.Argument(help="NAME, NAME@VERSION or NAME@ALIAS")],
         as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Show one version: where it is, its aliases, lineage and evaluation.

    Examples:

        homeforge registry show docs@champion
        homeforge registry show docs@2 --json
    """
    from homeforge.registry.store import Registry

    reg = Registry()
    r = reg.resolve(ref)
    out = {"name": r.name, **r.version, "aliases": reg.aliases_of(r.name, r.version["version"]), "dir": str(r.path)}
    if as_json:
        console.print_json(json.dumps(out))
        return
    lin = out["lineage"]
    console.print(f"[bold]{r.name}[/] version {out['version']} ({out['content_hash'][:12]}), aliases: "
                  f"{', '.join(out['aliases']) or 'none'}\n  dir: {out['dir']}\n  registered {out['registered']} from "
                  f"{out['source']}\n  {lin['stage']} {lin.get('method') or ''} created {lin['created']}, homeforge "
                  f"{lin['code'].get('homeforge')}, torch {lin['code'].get('torch')}\n  inputs: "
                  + ", ".join(f"{k} {v[:12]}" for k, v in lin["inputs"].items())
                  + f"\n  metrics: {json.dumps(lin['metrics'], default=str)[:300]}\n  privacy: {lin['privacy']}"
                  + (f"\n  eval: {json.dumps(out['eval']['metrics'], default=str)[:300]}" if "eval" in out else ""),
                  highlight=False)


@registry_app.command("alias")
def alias(target: Annotated[str, typer.Argument(help="NAME@ALIAS")],
          version: Annotated[str, typer.Argument(help="version number (or vN)")]) -> None:
    """Point an alias at a version (no gate; audited).

    Examples:

        homeforge registry alias docs@staging 3
    """
    from homeforge.registry.store import Registry

    name, _, al = target.partition("@")
    if not al or not version.lstrip("v").isdigit():
        raise HomeforgeError(f"expected NAME@ALIAS VERSION, got {target} {version}", fix="e.g. `docs@champion 2`")
    res = Registry().set_alias(name, al, int(version.lstrip("v")))
    console.print(f"{name}@{al} -> version {res['version']} (was {res['previous']})", highlight=False)


@registry_app.command("promote")
def promote(
    name: Annotated[str, typer.Argument(help="registry name")],
    src: Annotated[str, typer.Option("--from", help="alias of the candidate")] = "candidate",
    dst: Annotated[str, typer.Option("--to", help="alias to move")] = "champion",
    metric: Annotated[str, typer.Option(help="perplexity or accuracy")] = "perplexity",
    min_improvement: Annotated[float, typer.Option(min=0, help="smallest improvement that counts")] = 0.0,
    p_value: Annotated[float, typer.Option(min=1e-12, max=0.999, help="significance level")] = 0.01,
) -> None:
    """Move DST to SRC's version if it beats DST's version on the same held-out data (paired test).

    Refuses (exit code 3, nothing changed) when it is not significantly better.

    Examples:

        homeforge registry promote docs --from candidate --to champion
        homeforge registry promote tickets --metric accuracy --p-value 0.05
    """
    from homeforge.pipeline.spec import PromoteGates
    from homeforge.registry.store import Registry

    gates = PromoteGates(metric=metric, min_improvement=min_improvement, p_value=p_value)
    console.print(Registry().promote(name, src, dst, gates)["message"], highlight=False)


@registry_app.command("rollback")
def rollback(name: Annotated[str, typer.Argument(help="registry name")],
             alias: Annotated[str, typer.Option(help="alias to move back")] = "champion") -> None:
    """Point the alias back at the version it named before its last change.

    Examples:

        homeforge registry rollback docs
    """
    from homeforge.registry.store import Registry

    res = Registry().rollback(name, alias)
    console.print(f"{name}@{alias} -> version {res['version']} (was {res['previous']})", highlight=False)


@registry_app.command("diff")
def diff(a: Annotated[str, typer.Argument(help="NAME@VERSION or NAME@ALIAS")],
         b: Annotated[str, typer.Argument(help="NAME@VERSION or NAME@ALIAS")]) -> None:
    """Two versions side by side: the config keys, inputs and metrics that differ.

    Examples:

        homeforge registry diff docs@champion docs@candidate
        homeforge registry diff docs@1 docs@3
    """
    from homeforge.config import flatten
    from homeforge.registry.store import Registry

    reg = Registry()
    ra, rb = reg.resolve(a), reg.resolve(b)
    table = Table(title=f"{a} (version {ra.version['version']}) vs {b} (version {rb.version['version']})")
    for col in ("", "key", a, b):
        table.add_column(col)
    la, lb = ra.version["lineage"], rb.version["lineage"]
    ea, eb = ra.version.get("eval", {}), rb.version.get("eval", {})
    for section, da, db in (("config", la["config"], lb["config"]), ("inputs", la["inputs"], lb["inputs"]),
                            ("code", la["code"], lb["code"]), ("train metrics", la["metrics"], lb["metrics"]),
                            ("eval", {"data": ea.get("data"), **ea.get("metrics", {})},
                             {"data": eb.get("data"), **eb.get("metrics", {})})):
        fa, fb = flatten(da or {}), flatten(db or {})
        for k in sorted(set(fa) | set(fb)):
            if fa.get(k) != fb.get(k):
                table.add_row(section, k, _short(fa.get(k)), _short(fb.get(k)))
    console.print(table)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return s[:16] if isinstance(v, str) and len(s) == 64 else s[:60]

"""What every command shares: the app and its groups, consoles, option types, config loading."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

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
audit_app = typer.Typer(help="The tamper-evident audit log: verify, show, prune.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")

# options whose values the audit log never holds in clear (besides every option named like a secret),
# and options whose values are prompt text (logged as a hash and a length): security/masking.py
SECRET_FLAGS = ("--api-key", "-k")
PROMPT_FLAGS = ("--prompt", "-p", "--system")

# soft_wrap: a message or a command to copy is never split mid-phrase at the terminal width
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="config overrides as KEY.SUB=VALUE (see `homeforge config show STAGE`)", show_default=False),
]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file", show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="re-run even if an up-to-date artifact exists; replace it")]


def load(ctx: typer.Context | None, schema, config: Path | None, overrides: list[str] | None,
         base: dict | None = None, **updates: Any):
    """Load ``schema`` from defaults, ``--config``, ``KEY=VALUE`` overrides, then typed flags.

    Typed flags (``updates``, dotted keys given with ``__``, e.g. ``train__max_steps=5``) are
    taken as the values they are, never re-parsed as YAML; None means "not given". The
    global ``--encrypt`` flag sets ``encrypt`` on stages that write artifacts.
    """
    from homeforge.config import load_config

    typed = {k.replace("__", "."): v for k, v in updates.items()}
    if ctx is not None and (ctx.find_root().obj or {}).get("encrypt") and "encrypt" in schema.model_fields:
        typed["encrypt"] = True
    return load_config(schema, config, list(overrides or []), base=base, updates=typed)

"""`homeforge keys init/status/rotate` (data keys), `homeforge audit ...` and `homeforge verify`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from homeforge.cli._common import app, audit_app, console, err_console, keys_app
from homeforge.errors import HomeforgeError


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
    from homeforge import paths
    from homeforge.security import audit, keys

    k = keys.init_key(key_file)
    console.print(f"created data key [bold]{k.key_id}[/] in {k.source} (mode 600)", highlight=False)
    a = audit.AuditLog(key=None).create_key()  # under the log's lock, logged as a signed line
    if a is not None and paths.serve_audit_file().is_file():  # the server's log learns of it too
        audit.AuditLog(paths.serve_audit_file(), key=a.secret).append({"event": audit.KEY_EVENT, "key_id": a.key_id})
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
    from homeforge.security.rotation import rotate_data_key

    rotate_data_key(artifacts_, force=force, keep_old=keep_old, say=lambda m: console.print(m, highlight=False))


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

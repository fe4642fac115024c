"""`homeforge keys init/status/rotate` (data keys), `homeforge audit ...` and `homeforge verify`."""

from __future__ import annotations

import json
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
    artifacts_: Annotated[list[Path] | None, typer.Option("--artifacts", help="also check that the log still holds "
                                                          "the line every artifact under this folder recorded "
                                                          "(catches lines cut from the end); repeatable")] = None,
) -> None:
    """Check the audit log's hash chain and HMAC signatures (every line must be signed once the
    audit key exists); name the first bad line.

    Exit code 0 = intact, 1 = tampered (edited, deleted, inserted or reordered lines, signatures
    removed, lines cut from the end that an artifact recorded).

    Examples:

        homeforge audit verify
        homeforge audit verify --artifacts homeforge-runs/
        homeforge audit verify --log /var/log/homeforge/audit.jsonl
    """
    from homeforge.security import audit, storage

    res = audit.verify(log)
    (console if res.ok else err_console).print(res.summary(), highlight=False)
    bad = 0
    for root in artifacts_ or []:
        for art in storage.find_artifacts(root):
            try:
                anchor = json.loads((art / "homeforge.json").read_text(encoding="utf-8")).get("audit")
            except (OSError, ValueError):
                continue
            problem = audit.check_anchor(anchor, where=str(art)) if anchor else None
            if problem:
                bad += 1
                err_console.print(f"[bold red]FAIL[/] {problem}", highlight=False)
    if artifacts_ and not bad:
        console.print("every artifact's recorded audit line is in the log, unchanged", highlight=False)
    if not res.ok or bad:
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
    artifact: Annotated[Path, typer.Argument(help="artifact directory (dataset, model, checkpoint, ...)")],
    decrypt: Annotated[bool, typer.Option("--decrypt", help="also authenticate every encrypted chunk with the data key")] = False,
    allow_missing_inputs: Annotated[bool, typer.Option("--allow-missing-inputs", help="accept recorded inputs that "
                                                       "cannot be found (a corpus that was moved)")] = False,
    adopt: Annotated[bool, typer.Option("--adopt", help="sign the manifests of ARTIFACT (or every artifact under it) "
                                        "with this machine's key, after re-checking every file: for artifacts made "
                                        "before the key existed or on another machine")] = False,
) -> None:
    """Check an artifact's seal, re-hash its files and the inputs it records (recursively, down to the
    raw documents); exit 1 on any mismatch or missing input.

    Traces a model to the exact dataset version, config, raw documents and homeforge version
    that made it. Inputs are looked for relative to the artifact, where the config points, then
    at their recorded absolute path; one that changed fails, one that cannot be found is
    "missing" (fails unless --allow-missing-inputs).

    Examples:

        homeforge verify homeforge-runs/quickstart/model
        homeforge verify runs/clinic/model && homeforge serve runs/clinic/model
        homeforge verify data/clinic --decrypt
        homeforge verify data/clinic --allow-missing-inputs
        homeforge verify --adopt homeforge-runs/
    """
    from homeforge.security.provenance import verify_tree

    if adopt:
        from homeforge import integrity
        from homeforge.security import storage

        found = storage.find_artifacts(artifact)
        if not found:
            raise HomeforgeError(f"no artifact (homeforge.json) at or under {artifact}", where=str(artifact),
                                 fix="pass an artifact directory or a folder holding artifacts")
        for art in found:
            sealed = integrity.adopt(art)
            console.print(f"adopted {art}: every file checked, manifest signed with {sealed['seal']['key']} key "
                          f"{sealed['seal']['key_id']}", highlight=False)
        return
    checks = verify_tree(artifact, decrypt=decrypt, allow_missing=allow_missing_inputs)
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

"""Rotating the data key: re-encrypt every artifact and loose encrypted file, then retire the old key."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from homeforge import paths
from homeforge.errors import HomeforgeError
from homeforge.security import keys, storage


def rotate_data_key(roots: list[Path], *, force: bool = False, keep_old: bool = False,
                    say: Callable[[str], None] = print) -> None:
    """``homeforge keys rotate``: re-encrypt artifacts under ``roots`` under a new key, each atomically.

    The new key comes from HOMEFORGE_NEW_KEY or is generated; with a key file it replaces the
    old one only once everything is re-encrypted (an interrupted rotation resumes from
    ``data.key.new``); the old key is overwritten and deleted unless ``keep_old``.
    """
    old = keys.load_key(required=True, force=force)
    file_key = old.source not in ("env", "command")
    pending = Path(old.source).with_name(Path(old.source).name + ".new") if file_key else None
    if given := paths.env("HOMEFORGE_NEW_KEY"):
        secret = keys._decode(given, "HOMEFORGE_NEW_KEY")
        new = keys.DataKey(secret, keys.key_id(secret), "env")
        if pending is not None:
            new = keys.write_key_file(pending, secret, replace=True)
    elif pending is not None and pending.is_file():
        new = keys.read_key_file(pending)
        say(f"resuming an interrupted rotation to key {new.key_id}")
    elif pending is not None:
        new = keys.init_key(pending)
    else:
        raise HomeforgeError("the data key comes from HOMEFORGE_KEY/HOMEFORGE_KEY_COMMAND: give the new key too",
                             fix="set HOMEFORGE_NEW_KEY to the new key (64 hex characters) from your KMS")
    if new.key_id == old.key_id:
        raise HomeforgeError("the new key is the same as the current one", fix="give a different HOMEFORGE_NEW_KEY")
    found = sorted({a for root in roots for a in storage.find_encrypted_artifacts(root)})
    for root in roots:
        if not root.exists():
            raise HomeforgeError(f"{root} does not exist", fix="pass artifact directories or folders holding them")
    total = 0
    for art in found:
        n = storage.rotate_artifact(art, old, new)
        total += n
        say(f"{art}: {n} files re-encrypted under {new.key_id}")
    signer = storage.seal_key_after_rotation(new)
    resealed = sum(storage.reseal(a, old.key_id, signer) for root in roots for a in storage.find_artifacts(root)
                   if a not in found)
    if resealed:
        say(f"{resealed} other artifacts signed with the old key re-signed with {signer.kind} key {signer.key_id}")
    for root in roots:  # checkpoints, logs and other encrypted files outside artifacts
        n = storage.rotate_loose_files(root, old, new, skip=found)
        total += n
        if n:
            say(f"{root}: {n} other encrypted files (checkpoints, logs) re-encrypted")
    if pending is not None:
        current = Path(old.source)
        if keep_old:
            retired = current.with_name(f"{current.name}.retired-{old.key_id}")
            os.replace(current, retired)
            say(f"old key kept in {retired}")
        old_copy = current.with_name(f"{current.name}.destroy-{old.key_id}")
        if not keep_old:
            old_copy.unlink(missing_ok=True)
            os.link(current, old_copy)  # a second name for the old key's bytes, to overwrite them below
        os.replace(pending, current)  # atomic: data.key is the old key or the new one, never missing
        if not keep_old:
            keys.destroy_key_file(old_copy)
            say(f"old key {old.key_id} overwritten and deleted")
    say(f"rotated {len(found)} artifacts ({total} files) from key {old.key_id} to {new.key_id}")

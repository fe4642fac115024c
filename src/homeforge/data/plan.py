"""What identifies a dataset artifact: its inputs, the config that matters, the PII secret's id.

``dataset_plan`` is the plan `homeforge prepare` makes (``plan.up_to_date``: it would skip);
`homeforge run` asks it the same question without preparing anything.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import platform
from pathlib import Path

from homeforge import artifacts
from homeforge.errors import HomeforgeError


def pii_secret(cfg) -> bytes | None:
    if not (cfg.pii.enabled and cfg.pii.mode == "pseudonym"):
        return None
    value = os.environ.get(cfg.pii.secret_env, "")
    if len(value) < 16:
        raise HomeforgeError(
            f"pii.mode=pseudonym needs a secret of at least 16 characters in ${cfg.pii.secret_env}",
            fix=f"export {cfg.pii.secret_env}=$(python -c 'import secrets; print(secrets.token_hex(32))') "
                "and keep it safe (the same secret gives the same pseudonyms)",
        )
    return value.encode()


def fingerprint_config(cfg, secret: bytes | None, builtins: list[str]) -> dict:
    conf = cfg.model_dump(mode="json", exclude={"output_dir", "workers", "inputs"})
    if secret:  # identifies the secret without revealing it
        conf["pii_secret_id"] = hmac.new(secret, b"homeforge-fingerprint", hashlib.sha256).hexdigest()[:16]
    if builtins:
        from homeforge.data.corpus import stdlib_dir

        conf["builtins"] = {"names": builtins, "python": platform.python_version(), "stdlib": str(stdlib_dir())}
    return conf


def input_paths(cfg, files: list[Path], names: dict[Path, str]) -> dict[str, Path]:
    inputs = {f"file:{names[p]}": p for p in files}
    for key, val in (("pii.terms_file", cfg.pii.terms_file), ("augment.synonyms_file", cfg.augment.synonyms_file),
                     ("tokenizer.from_dir", cfg.tokenizer.from_dir)):
        if val:
            if not Path(val).exists():
                raise HomeforgeError(f"{key} {val} does not exist", fix=f"check the path given in {key}")
            inputs[key] = Path(val)
    return inputs



def dataset_plan(cfg, *, force: bool = False, output: str | Path | None = None, found=None,
                 secret: bytes | None = None) -> artifacts.Plan:
    """The dataset artifact's plan (``plan.up_to_date`` says whether `prepare` would skip): the same
    inputs, config and fingerprint ``run`` uses. ``found``/``secret``: already discovered by the caller."""
    from homeforge.data.ingest import discover

    files, builtins, names = found if found is not None else discover(cfg.inputs)
    if found is None:
        secret = pii_secret(cfg)
    conf = fingerprint_config(cfg, secret, builtins)
    inputs = input_paths(cfg, files, names)
    out = Path(output or cfg.output_dir).expanduser()
    return artifacts.plan(out, stage="prepare", config=conf, inputs=inputs, force=force, encrypt=cfg.encrypt)

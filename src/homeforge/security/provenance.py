"""`homeforge verify ARTIFACT`: re-hash an artifact and the inputs its manifest recorded.

The manifest records every input by hash (the input artifact's content hash, or a file's
SHA-256) and where it was (``input_paths``: absolute, relative to the artifact, and the
working directory of the stage), the resolved config, the code version and when it was made,
all under its seal. ``verify_tree`` checks the seal and re-hashes the artifact's files, checks
the audit-log line the manifest names still exists unchanged (so lines cut from the end of the
log are caught), then finds each input (relative to the artifact first, then where the config
points, then the recorded absolute path, then beside the artifact) and checks it is still the
exact version that was used, recursively, so a model can be traced to the dataset, config,
raw documents and code that made it. An input that changed is a failure; one that cannot be
found is "missing", also a failure unless ``allow_missing`` (a corpus that was moved). An
input re-encrypted by ``homeforge keys rotate`` still matches through its ``rotations`` record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from homeforge import artifacts, integrity
from homeforge.errors import HomeforgeError


@dataclass
class Check:
    artifact: str
    stage: str | None
    ok: bool
    detail: str
    depth: int = 0
    facts: dict = field(default_factory=dict)


def _config_paths(config, base: Path) -> dict[str, list[Path]]:
    """Every string in the config that names an existing path, keyed by its (leaf) key."""
    out: dict[str, list[Path]] = {}

    def walk(v, key: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, str(k))
        elif isinstance(v, list):
            for x in v:
                walk(x, key)
        elif isinstance(v, str) and v and len(v) < 4096:
            for cand in (Path(v).expanduser(), base / v):
                try:
                    if cand.exists():
                        out.setdefault(key, []).append(cand.absolute())
                        break
                except OSError:
                    continue

    walk(config, "")
    return out


def _known_hashes(path: Path) -> set[str]:
    """The hashes an input has had: current content hash, plus those before key rotations."""
    try:
        h = {artifacts.hash_input(path)}
    except HomeforgeError:
        return set()
    if (path / artifacts.MANIFEST).is_file():
        m = artifacts.read_manifest(path)
        h |= {r.get("previous_content_hash") for r in m.get("rotations", [])}
    return h


_ALIASES = {"dataset": ("data", "data_dir", "dataset"), "model": ("model", "path", "base", "model_dir"),
            "teacher": ("teacher",), "base": ("base", "model", "path")}


def _named_input(name: str, candidates: dict[str, list[Path]], artifact: Path) -> Path | None:
    """Where the config says input ``name`` lives (by key or a known alias), else the only other artifact named."""
    for key in (name, *_ALIASES.get(name, ())):
        if candidates.get(key):
            return candidates[key][0]
    others = {c for cs in candidates.values() for c in cs
              if (c / artifacts.MANIFEST).is_file() and c != artifact and c not in artifact.parents}
    return others.pop() if len(others) == 1 else None


def _decrypt_check(p: Path, manifest: dict) -> str | None:
    """Authenticate every chunk of every encrypted file with the current key; the first problem or None."""
    from homeforge.security import crypto

    for rel in (manifest.get("encryption") or {}).get("files", []):
        f = p / rel
        try:
            if crypto.is_encrypted_log(f):
                crypto.read_bytes(f)
            else:
                c = crypto._Chunks(f)
                try:
                    c.verify_all()
                finally:
                    c.close()
        except HomeforgeError as exc:
            return exc.what
    return None


def _located(name: str, m: dict, artifact: Path) -> list[Path]:
    """Where the manifest says input ``name`` was: relative to the artifact first, then the absolute path."""
    loc = (m.get("input_paths") or {}).get(name) or {}
    out = []
    if loc.get("from_artifact"):
        out.append((artifact / loc["from_artifact"]).resolve())
    if loc.get("path"):
        out.append(Path(loc["path"]))
    if not loc and name.startswith("file:"):  # older manifests: names relative to the prepare directory
        rel = name.split(":", 1)[1]
        out += [artifact.parent / rel, Path(rel).absolute()]
    return out


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError:
        return False


def verify_tree(path: str | Path, max_depth: int = 8, decrypt: bool = False, allow_missing: bool = False) -> list[Check]:
    """Checks for the artifact and, recursively, its recorded inputs (first = the artifact).

    ``decrypt`` also authenticates every encrypted chunk with the current data key;
    ``allow_missing`` accepts inputs that cannot be found (they are still listed as missing).
    """
    checks: list[Check] = []
    seen: set[Path] = set()

    def visit(p: Path, depth: int) -> None:
        p = p.absolute()
        if p in seen or depth > max_depth:
            return
        seen.add(p)
        try:
            m = artifacts.verify(p, deep=True)
        except HomeforgeError as exc:
            checks.append(Check(str(p), None, False, exc.what, depth))
            return
        status = integrity.check_seal(m, p / artifacts.MANIFEST)
        facts = {"created": m.get("created"), "homeforge": (m.get("versions") or {}).get("homeforge"),
                 "fingerprint": m.get("fingerprint", "")[:16], "content_hash": m["content_hash"][:16],
                 "encrypted": bool(m.get("encryption")), "user": (m.get("host") or {}).get("user"),
                 "seal": status.state}
        problem = _decrypt_check(p, m) if decrypt else None
        if problem is None and m.get("audit"):
            from homeforge.security import audit

            problem = audit.check_anchor(m["audit"], where=str(p))
        if problem:
            checks.append(Check(str(p), m.get("stage"), False, problem, depth, facts))
            return
        enc = f"; {len(m['encryption']['files'])} encrypted files authenticated" if decrypt and m.get("encryption") else ""
        checks.append(Check(str(p), m.get("stage"), True, f"{len(m['files'])} files match their recorded hashes; "
                            f"{status.detail}{enc}", depth, facts))
        candidates = _config_paths(m.get("config", {}), p.parent)
        for name, recorded in (m.get("inputs") or {}).items():
            located = _located(name, m, p)
            named = candidates.get(name, []) + [c for k, cs in candidates.items() if k != name for c in cs]
            places = [*located[:1], *named, *located[1:]]
            match = next((c for c in places if _exists(c) and recorded in _known_hashes(c)), None)
            if match is None:  # not where it was recorded: look at the artifacts beside this one
                siblings = [d for d in sorted(p.parent.iterdir()) if d != p and (d / artifacts.MANIFEST).is_file()]
                match = next((d for d in siblings if recorded in _known_hashes(d)), None)
            where = next((c for c in [*located, *([_named_input(name, candidates, p)] if not located else [])]
                          if c is not None and _exists(c)), None)
            if match is not None:
                checks.append(Check(str(match), None, True, f"input {name!r} is the recorded version "
                                    f"({recorded[:16]})", depth + 1))
                if match.is_dir() and (match / artifacts.MANIFEST).is_file():
                    visit(match, depth + 1)
            elif where is not None:
                try:
                    now = artifacts.hash_input(where)[:16]
                except HomeforgeError as exc:
                    now = f"unreadable ({exc.what})"
                checks.append(Check(str(where), None, False,
                                    f"input {name!r} has changed since {p.name} was made: recorded {recorded[:16]}, "
                                    f"now {now}", depth + 1))
            else:
                at = f" (was {located[-1]})" if located else ""
                checks.append(Check(name, None, allow_missing, f"input {name!r} ({recorded[:16]}) is missing: not found "
                                    f"on this machine{at}" + ("; accepted (--allow-missing-inputs)" if allow_missing
                                                             else "; pass --allow-missing-inputs if it was moved"),
                                    depth + 1, {"missing": True}))

    visit(Path(path), 0)
    return checks

"""`homeforge verify ARTIFACT`: re-hash an artifact and the inputs its manifest recorded.

The manifest records every input by hash (the input artifact's content hash, or a file's
SHA-256), the resolved config, the code version and when it was made. ``verify_tree``
re-hashes the artifact's files, then looks for each input where the config points
(any path in the config, relative to the working directory or the artifact) and checks
it is still the exact version that was used, recursively, so a model can be traced to
the dataset, config and code that made it. An input that was re-encrypted by
``homeforge keys rotate`` still matches through its manifest's ``rotations`` record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from homeforge import artifacts
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


def verify_tree(path: str | Path, max_depth: int = 8, decrypt: bool = False) -> list[Check]:
    """Checks for the artifact and, recursively, its recorded inputs (first = the artifact).

    ``decrypt`` also authenticates every encrypted chunk with the current data key.
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
        facts = {"created": m.get("created"), "homeforge": (m.get("versions") or {}).get("homeforge"),
                 "fingerprint": m.get("fingerprint", "")[:16], "content_hash": m["content_hash"][:16],
                 "encrypted": bool(m.get("encryption")), "user": (m.get("host") or {}).get("user")}
        problem = _decrypt_check(p, m) if decrypt else None
        if problem:
            checks.append(Check(str(p), m.get("stage"), False, problem, depth, facts))
            return
        enc = f"; {len(m['encryption']['files'])} encrypted files authenticated" if decrypt and m.get("encryption") else ""
        checks.append(Check(str(p), m.get("stage"), True, f"{len(m['files'])} files match their recorded hashes{enc}",
                            depth, facts))
        candidates = _config_paths(m.get("config", {}), p.parent)
        for name, recorded in (m.get("inputs") or {}).items():
            paths = candidates.get(name, []) + [c for k, cs in candidates.items() if k != name for c in cs]
            match = next((c for c in paths if recorded in _known_hashes(c)), None)
            if match is None:  # not where the config points: look at the artifacts beside this one
                siblings = [d for d in sorted(p.parent.iterdir()) if d != p and (d / artifacts.MANIFEST).is_file()]
                match = next((d for d in siblings if recorded in _known_hashes(d)), None)
            if match is not None:
                checks.append(Check(str(match), None, True, f"input {name!r} is the recorded version "
                                    f"({recorded[:16]})", depth + 1))
                if match.is_dir() and (match / artifacts.MANIFEST).is_file():
                    visit(match, depth + 1)
            elif (where := _named_input(name, candidates, p)) is not None:
                checks.append(Check(str(where), None, False,
                                    f"input {name!r} has changed since {p.name} was made: recorded {recorded[:16]}, "
                                    f"now {artifacts.hash_input(where)[:16]}", depth + 1))
            else:
                checks.append(Check(name, None, True, f"input {name!r} ({recorded[:16]}) was not found on this "
                                    "machine: not checked", depth + 1, {"missing": True}))

    visit(Path(path), 0)
    return checks

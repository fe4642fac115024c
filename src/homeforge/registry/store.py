"""The model registry on disk: immutable, content-addressed versions with lineage, aliases, gates.

Layout under ``paths.registry_dir()`` (``$HOMEFORGE_REGISTRY``, default HOME/registry)::

    NAME/index.json           versions, aliases, the history of every alias change
    NAME/versions/HASH16/     a copy of the model artifact (its homeforge.json included), never changed
    NAME/evals/HASH16.json    the evaluation a version was registered with (per-example results)
    NAME/.lock                every change holds it (flock): two writers never interleave

``index.json`` is replaced atomically (``_fs.atomic_write_text``) under the lock, after the
version folder is complete, so a reader sees the old or the new state, never a mix. Every
change is a line in the audit log.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homeforge import artifacts, paths
from homeforge._fs import atomic_write_text, fsync_tree, locked, private_temp_dir
from homeforge.errors import HomeforgeError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


class GateRefused(HomeforgeError):
    """A promotion the gates refused (nothing changed)."""

    exit_code = 3


@dataclass
class Resolved:
    name: str
    version: dict
    path: Path
    alias: str | None = None


def _audit(event: str, **fields: Any) -> None:
    from homeforge.security.audit import AuditLog

    AuditLog().append({"event": f"registry-{event}", **fields})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Registry:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else paths.registry_dir()

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "index.json").is_file())

    def index(self, name: str, must_exist: bool = True) -> dict:
        f = self.root / name / "index.json"
        if not f.is_file():
            if must_exist:
                known = self.names()
                raise HomeforgeError(f"the registry has no model named {name!r}", where=str(self.root),
                                     fix=f"known names: {', '.join(known)}" if known else
                                     "register one first: `homeforge registry register MODEL_DIR --name NAME`")
            return {"name": name, "versions": [], "aliases": {}, "history": []}
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HomeforgeError(f"the registry index {f} is unreadable ({exc})", where=str(f),
                                 fix="restore it from a backup; versions are intact under versions/") from None

    def find(self, name: str, content_hash: str) -> dict | None:
        return next((v for v in self.index(name, must_exist=False)["versions"] if v["content_hash"] == content_hash),
                    None)

    def aliases_of(self, name: str, version: int) -> list[str]:
        return sorted(a for a, v in self.index(name, must_exist=False)["aliases"].items() if v == version)

    def resolve(self, ref: str) -> Resolved:
        """``NAME``, ``NAME@3`` / ``NAME@v3`` (a version) or ``NAME@ALIAS``; a bare NAME is its champion (else
        its latest version)."""
        name, _, sel = ref.partition("@")
        idx = self.index(name)
        if not idx["versions"]:
            raise HomeforgeError(f"{name} has no versions", where=str(self.root / name))
        alias = None
        if not sel:
            alias = "champion" if "champion" in idx["aliases"] else None
            number = idx["aliases"].get("champion", idx["versions"][-1]["version"])
        elif re.fullmatch(r"v?\d+", sel):
            number = int(sel.lstrip("v"))
        elif sel in idx["aliases"]:
            alias, number = sel, idx["aliases"][sel]
        else:
            raise HomeforgeError(f"{name} has no alias or version {sel!r}", where=str(self.root / name / "index.json"),
                                 fix=f"aliases: {', '.join(sorted(idx['aliases'])) or 'none'}; versions: "
                                     f"{', '.join(str(v['version']) for v in idx['versions'])}")
        v = next((v for v in idx["versions"] if v["version"] == number), None)
        if v is None:
            raise HomeforgeError(f"{name} has no version {number}", where=str(self.root / name / "index.json"),
                                 fix=f"versions: {', '.join(str(v['version']) for v in idx['versions'])}")
        return Resolved(name, v, self.root / name / v["path"], alias)

    def eval_of(self, name: str, version: dict) -> dict | None:
        f = self.root / name / "evals" / f"{version['content_hash'][:16]}.json"
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def _changing(self, name: str, create: bool = False) -> Iterator[dict]:
        """Hold NAME's lock, yield its index for changes, then replace it atomically."""
        if not NAME_RE.match(name):
            raise HomeforgeError(f"registry name {name!r} is not allowed",
                                 fix="letters, digits, '.', '_' and '-', starting with a letter or digit (64 at most)")
        folder = self.root / name
        if not create and not (folder / "index.json").is_file():
            self.index(name)  # raises: no such name
        folder.mkdir(parents=True, exist_ok=True)
        with locked(folder / ".lock"):
            idx = self.index(name, must_exist=not create)
            yield idx
            atomic_write_text(folder / "index.json", json.dumps(idx, indent=2))

    def register(self, model_dir: str | Path, name: str, *, eval_dir: str | Path | None = None,
                 alias: str | None = "candidate") -> tuple[dict, bool]:
        """Add ``model_dir`` (a model artifact) as a new version, or return the version with the same content.
        Returns (version, created)."""
        model_dir = Path(model_dir).expanduser().absolute()
        manifest = artifacts.verify(model_dir)  # every file as its manifest says, before it is copied
        if alias is not None and not ALIAS_RE.match(alias):
            raise HomeforgeError(f"alias {alias!r} is not allowed", fix="a letter, then letters, digits, '_' or '-'")
        evaluation = _evaluation(Path(eval_dir), manifest) if eval_dir else None
        with self._changing(name, create=True) as idx:
            found = next((v for v in idx["versions"] if v["content_hash"] == manifest["content_hash"]), None)
            created = found is None
            if created:
                found = self._add_version(name, idx, model_dir, manifest, evaluation)
            elif evaluation is not None and self.eval_of(name, found) is None:
                self._store_eval(name, found, evaluation)
            if alias is not None and idx["aliases"].get(alias) != found["version"]:
                _set_alias(idx, alias, found["version"], "register")
        _audit("register", name=name, version=found["version"], content_hash=manifest["content_hash"],
               created=created, alias=alias, source=str(model_dir))
        return found, created

    def _add_version(self, name: str, idx: dict, model_dir: Path, manifest: dict, evaluation: dict | None) -> dict:
        folder = self.root / name
        rel = f"versions/{manifest['content_hash'][:16]}"
        dest = folder / rel
        if not dest.is_dir():  # content-addressed: the same bytes are one folder
            tmp = private_temp_dir(folder / "versions", manifest["content_hash"][:16])
            try:
                shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
                artifacts.verify(tmp)
                for p in tmp.rglob("*"):  # immutable: read-only files
                    if p.is_file():
                        p.chmod(0o444)
                tmp.chmod(0o755)
                fsync_tree(tmp)
                tmp.rename(dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        version = {
            "version": max((v["version"] for v in idx["versions"]), default=0) + 1,
            "content_hash": manifest["content_hash"],
            "path": rel,
            "registered": _now(),
            "source": str(model_dir),
            "lineage": lineage(manifest),
        }
        idx["versions"].append(version)
        if evaluation is not None:
            self._store_eval(name, version, evaluation)
        return version

    def _store_eval(self, name: str, version: dict, evaluation: dict) -> None:
        d = self.root / name / "evals"
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / f"{version['content_hash'][:16]}.json", json.dumps(evaluation))
        version["eval"] = {k: evaluation[k] for k in ("data", "split", "metrics", "gates")}

    def set_alias(self, name: str, alias: str, version: int) -> dict:
        if not ALIAS_RE.match(alias):
            raise HomeforgeError(f"alias {alias!r} is not allowed", fix="a letter, then letters, digits, '_' or '-'")
        with self._changing(name) as idx:
            if not any(v["version"] == version for v in idx["versions"]):
                raise HomeforgeError(f"{name} has no version {version}", where=str(self.root / name / "index.json"),
                                     fix=f"versions: {', '.join(str(v['version']) for v in idx['versions'])}")
            before = idx["aliases"].get(alias)
            _set_alias(idx, alias, version, "alias")
        _audit("alias", name=name, alias=alias, version=version, previous=before)
        return {"alias": alias, "version": version, "previous": before}

    def promote(self, name: str, src: str, dst: str, gates) -> dict:
        """Point ``dst`` at ``src``'s version if it passes the gates against ``dst``'s current version."""
        from homeforge.registry.gates import check

        with self._changing(name) as idx:
            if src not in idx["aliases"]:
                raise HomeforgeError(f"{name} has no alias {src!r}", where=str(self.root / name / "index.json"),
                                     fix=f"aliases: {', '.join(sorted(idx['aliases'])) or 'none'}")
            cand = next(v for v in idx["versions"] if v["version"] == idx["aliases"][src])
            cur_no = idx["aliases"].get(dst)
            if cur_no == cand["version"]:
                return {"promoted": False, "message": f"{name}@{dst} is already version {cur_no}"}
            champ = next((v for v in idx["versions"] if v["version"] == cur_no), None)
            verdict = check(self.eval_of(name, cand), self.eval_of(name, champ) if champ else None, gates,
                            cand["version"], cur_no)
            if not verdict["passed"]:
                _audit("promote-refused", name=name, src=src, dst=dst, version=cand["version"], champion=cur_no,
                       reason=verdict["detail"])
                raise GateRefused(f"promotion of {name}@{src} (version {cand['version']}) to @{dst} refused: "
                                  f"{verdict['detail']}", where=str(self.root / name),
                                  fix="train a better model, or change the gate (gates.* / --p-value, "
                                      "--min-improvement) if this is expected")
            _set_alias(idx, dst, cand["version"], "promote", verdict=verdict["detail"])
        _audit("promote", name=name, src=src, dst=dst, version=cand["version"], previous=cur_no,
               reason=verdict["detail"])
        return {"promoted": True, "version": cand["version"], "previous": cur_no,
                "message": f"promoted {name} version {cand['version']} to @{dst}: {verdict['detail']}"}

    def rollback(self, name: str, alias: str = "champion") -> dict:
        """Point ``alias`` back at the version it named before its last change."""
        with self._changing(name) as idx:
            trail = idx.get("trails", {}).get(alias, [])
            if len(trail) < 2:
                raise HomeforgeError(f"{name}@{alias} has no earlier version to roll back to",
                                     where=str(self.root / name / "index.json"),
                                     fix=f"set one with `homeforge registry alias {name}@{alias} VERSION`")
            current = trail.pop()
            previous = trail[-1]
            idx["aliases"][alias] = previous
            idx["history"].append({"time": _now(), "action": "rollback", "alias": alias, "from": current,
                                   "to": previous, "user": artifacts.host_facts()["user"]})
        _audit("rollback", name=name, alias=alias, version=previous, previous=current)
        return {"alias": alias, "version": previous, "previous": current}


def _set_alias(idx: dict, alias: str, version: int, action: str, **extra: Any) -> None:
    before = idx["aliases"].get(alias)
    idx["aliases"][alias] = version
    idx.setdefault("trails", {}).setdefault(alias, []).append(version)  # what rollback walks back
    idx["history"].append({"time": _now(), "action": action, "alias": alias, "from": before, "to": version,
                           "user": artifacts.host_facts()["user"], **extra})


def lineage(manifest: dict) -> dict:
    """What made a model, from its manifest: dataset, config, code version, metrics, privacy, resumes."""
    task = manifest.get("task") or {}
    return {
        "stage": manifest.get("stage"),
        "method": manifest.get("method"),
        "kind": manifest.get("kind"),
        "created": manifest.get("created"),
        "inputs": manifest.get("inputs", {}),
        "input_paths": {k: v.get("path") for k, v in (manifest.get("input_paths") or {}).items()},
        "config": manifest.get("config", {}),
        "metrics": manifest.get("metrics", {}),
        "code": manifest.get("versions", {}),
        "privacy": task.get("privacy") or {"dp": False},
        "encrypted": "encryption" in manifest,
        "resumed_from": manifest.get("resumed_from"),
        "seal": (manifest.get("integrity") or {}).get("digest"),
    }


def _evaluation(eval_dir: Path, model_manifest: dict) -> dict | None:
    """The per-example results of ``eval_dir`` when it evaluated this very model (else None)."""
    if not (eval_dir / "eval.json").is_file():
        raise HomeforgeError(f"{eval_dir} is not an evaluation report (no eval.json)", where=str(eval_dir),
                             fix="pass the folder `homeforge eval` wrote (default MODEL_DIR-eval)")
    m = artifacts.verify(eval_dir)
    if m.get("inputs", {}).get("model") != model_manifest["content_hash"]:
        raise HomeforgeError(f"{eval_dir} evaluated another model than the one being registered", where=str(eval_dir),
                             fix="evaluate this model (`homeforge eval MODEL_DIR --data DATA`) and pass that report")
    res = json.loads((eval_dir / "eval.json").read_text(encoding="utf-8"))
    model = res["model"]
    per = model.get("per_example", {})
    return {"data": m["inputs"]["data"], "split": m["config"].get("split"), "metrics": m.get("metrics", {}),
            "gates": res.get("gates", []),
            "config": {k: m["config"].get(k) for k in ("split", "max_examples", "context", "stride")},
            "ppl": (model.get("perplexity") or {}).get("ppl"),
            "accuracy": (model.get("classification") or {}).get("accuracy"),
            "doc_loss": per.get("doc_loss"), "correct": per.get("correct")}

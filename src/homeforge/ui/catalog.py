"""What the dashboard shows, read from what the stages wrote under the root folder.

Datasets (``prepare`` artifacts: report.json, plots, lineage, encryption), runs (folders with a
``metrics.jsonl``, finished or still training), evaluations (``eval`` artifacts) and exports
(``export-*`` artifacts). Nothing here writes; the manifests are read with their seals checked
(``artifacts.read_manifest``), and a folder whose manifest does not check is listed as broken.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from homeforge import artifacts
from homeforge.errors import HomeforgeError

MAX_DEPTH = 4
SKIP = {".git", ".venv", "node_modules", "__pycache__", "checkpoints", "tensorboard", "mlflow-artifacts"}
CURVES = ("loss", "val_loss", "lr", "tokens_per_s", "mfu")


@dataclass
class Item:
    """One artifact or run folder under the root: ``id`` is its path relative to the root."""

    id: str
    path: Path
    stage: str
    manifest: dict = field(default_factory=dict)
    problem: str | None = None

    @property
    def created(self) -> str:
        return str(self.manifest.get("created", ""))

    @property
    def encrypted(self) -> bool:
        return "encryption" in self.manifest


def _walk(root: Path):
    """Folders under ``root`` (depth-limited, hidden and bulky ones skipped); an artifact's insides are not walked."""
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name, reverse=True)
        except OSError:
            continue
        names = {e.name for e in entries}
        yield d, names
        if artifacts.MANIFEST in names or depth >= MAX_DEPTH:
            continue
        stack.extend((Path(e.path), depth + 1) for e in entries
                     if e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and e.name not in SKIP)


def scan(root: Path) -> list[Item]:
    """Every artifact and run folder under ``root``, sorted by path."""
    root = Path(root)
    out = []
    for d, names in _walk(root):
        rel = d.relative_to(root).as_posix() if d != root else "."
        if artifacts.MANIFEST in names:
            try:
                m = artifacts.read_manifest(d)
                out.append(Item(rel, d, str(m.get("stage")), m))
            except HomeforgeError as exc:
                out.append(Item(rel, d, "broken", problem=exc.what))
        elif "metrics.jsonl" in names or "train.yaml" in names:
            out.append(Item(rel, d, "run"))
    return sorted(out, key=lambda i: i.id)


def of_stage(items: list[Item], *stages: str) -> list[Item]:
    return [i for i in items if i.stage in stages or any(s.endswith("*") and i.stage.startswith(s[:-1]) for s in stages)]


def find(root: Path, rel: str) -> Path:
    """The folder ``rel`` under ``root``; refuses anything outside it (``..``, absolute paths, links out)."""
    root = Path(root).resolve()
    p = (root / rel).resolve()
    if p != root and root not in p.parents:
        raise HomeforgeError(f"{rel!r} is outside the dashboard's root folder", fix="pick an item from the lists")
    if not p.is_dir():
        raise HomeforgeError(f"{rel!r} does not exist under {root}", fix="pick an item from the lists")
    return p


# --------------------------------------------------------------------------- datasets


def dataset(root: Path, rel: str) -> dict:
    """A dataset's report, lineage, encryption status and plots."""
    p = find(root, rel)
    m = artifacts.read_manifest(p)
    if m.get("stage") != "prepare":
        raise HomeforgeError(f"{rel} is a {m.get('stage')} artifact, not a dataset", fix="pick a dataset from the list")
    report = json.loads((p / "report.json").read_text(encoding="utf-8")) if (p / "report.json").is_file() else {}
    return {"id": rel, "path": str(p), "manifest": m, "report": report, "lineage": lineage(m),
            "encryption": m.get("encryption"), "plots": [n for n in ("lengths.png", "labels.png") if (p / n).is_file()]}


def lineage(m: dict) -> dict:
    """Where an artifact came from: inputs (hash and path), code versions, host, when."""
    paths = m.get("input_paths") or {}
    return {"inputs": [{"name": k, "hash": v, "path": (paths.get(k) or {}).get("path")}
                       for k, v in (m.get("inputs") or {}).items()],
            "versions": m.get("versions") or {}, "host": (m.get("host") or {}).get("hostname"),
            "user": (m.get("host") or {}).get("user"), "created": m.get("created"),
            "content_hash": m.get("content_hash"), "audit": m.get("audit")}


# --------------------------------------------------------------------------- runs


def metrics_after(run_dir: Path, offset: int = 0, inode: int | None = None) -> dict:
    """New metric records from byte ``offset`` on: ``{"records", "offset", "inode", "reset"}``.

    Only whole lines are read (a line being written waits for the next poll). A resumed run rewrites the
    file (``tracking.truncate_metrics``: a new inode, maybe shorter): then it is read again from the start
    and ``reset`` tells the page to drop what it drew."""
    f = Path(run_dir) / "metrics.jsonl"
    try:
        st = f.stat()
    except FileNotFoundError:
        return {"records": [], "offset": 0, "inode": None, "reset": offset > 0}
    reset = (inode is not None and inode != st.st_ino) or offset > st.st_size
    if reset:
        offset = 0
    with open(f, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    whole = data[:data.rfind(b"\n") + 1]
    records = [json.loads(line) for line in whole.decode("utf-8").splitlines() if line.strip()]
    return {"records": records, "offset": offset + len(whole), "inode": st.st_ino, "reset": reset}


def recently_written(run_dir: Path, seconds: float = 120.0) -> bool:
    """The run's metrics.jsonl changed in the last ``seconds`` (a run trained from the CLI is live too)."""
    import time

    f = Path(run_dir) / "metrics.jsonl"
    return f.is_file() and time.time() - f.stat().st_mtime < seconds


def curves(records: list[dict]) -> dict[str, list[list[float]]]:
    """``{metric: [[step, value], ...]}`` for the charted metrics (missing values left out)."""
    out: dict[str, list[list[float]]] = {k: [] for k in CURVES}
    for r in records:
        for k in CURVES:
            v = r.get(k)
            if isinstance(v, (int, float)):
                out[k].append([r.get("step", 0), float(v)])
    return out


def run(root: Path, rel: str) -> dict:
    p = find(root, rel)
    model = p / "model"
    m = None
    if (model / artifacts.MANIFEST).is_file():
        try:
            m = artifacts.read_manifest(model)
        except HomeforgeError:
            m = None
    recs = metrics_after(p)["records"]
    cfg_file = p / "train.yaml"
    return {"id": rel, "path": str(p), "records": len(recs), "last": recs[-1] if recs else {},
            "finished": m is not None, "model": m, "model_id": f"{rel}/model" if m else None,
            "config_yaml": cfg_file.read_text(encoding="utf-8") if cfg_file.is_file() else None,
            "checkpoints": sorted(c.name for c in (p / "checkpoints").iterdir()) if (p / "checkpoints").is_dir() else []}


# --------------------------------------------------------------------------- evaluations and exports


def evaluation(root: Path, rel: str) -> dict:
    p = find(root, rel)
    m = artifacts.read_manifest(p)
    result = json.loads((p / "eval.json").read_text(encoding="utf-8")) if (p / "eval.json").is_file() else {}
    flat = {k: v for k, v in (m.get("metrics") or {}).items() if isinstance(v, (int, float, str))}
    comparison = {name: {k: v for k, v in t.items() if isinstance(v, (int, float, str))}
                  for name, t in (result.get("comparison") or {}).items() if isinstance(t, dict)}
    return {"id": rel, "path": str(p), "manifest": m, "metrics": flat, "lineage": lineage(m),
            "plots": sorted(f.name for f in p.glob("*.png")), "comparison": comparison,
            "gates": [g for g in result.get("gates") or [] if isinstance(g, dict)]}


def plot_file(root: Path, rel: str, name: str) -> Path:
    """A PNG plot an artifact or run wrote (only ``*.png`` directly in the folder)."""
    p = find(root, rel)
    f = p / name
    if "/" in name or not name.endswith(".png") or not f.is_file():
        raise HomeforgeError(f"no plot {name!r} in {rel}", fix="pick a plot shown on the page")
    return f

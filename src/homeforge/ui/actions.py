"""What the dashboard's buttons do, through the same library functions and commands as the CLI.

A run is started as ``homeforge train --config RUNS/NAME.yaml`` (the YAML shown to the user, checked
with the CLI's own config loader first), stopped with SIGTERM (the trainer checkpoints the step it
is on and stops), resumed with ``--resume latest``. Promotions and rollbacks call the registry
(``registry.store``: the same gates, the same audit lines). Every action writes a ``ui-*`` line to
the audit log naming the key that did it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from homeforge.errors import HomeforgeError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RUNS = "runs"  # under the root: NAME.yaml (the config) and NAME/ (the run folder)
FORM_FIELDS = ("method", "model.preset", "max_steps", "seq_len", "optim.lr", "eval_every", "log_every", "threads")


def audit(event: str, session, **fields: Any) -> None:
    from homeforge.security.audit import AuditLog

    AuditLog().append({"event": f"ui-{event}", "ui_user": session.name if session else None,
                       "key_id": session.key_id if session else None,
                       "role": session.role if session else None, **fields})


# --------------------------------------------------------------------------- runs


def run_config(root: Path, name: str, data: str, values: dict[str, str], overrides: str = "") -> tuple[dict, str]:
    """The config dict and its YAML for a run form: its fields and extra ``KEY.SUB=VALUE`` lines, parsed like
    the CLI's overrides and validated by its loader (a bad field fails here, in the same words)."""
    from homeforge.config import TrainConfig, load_config
    from homeforge.config.base import deep_merge, parse_overrides
    from homeforge.errors import ConfigError

    if not NAME_RE.match(name or ""):
        raise HomeforgeError(f"run name {name!r} is not allowed", fix="letters, digits, '.', '_' or '-' (at most 64)")
    lines = [f"{k}={(values.get(k) or '').strip()}" for k in FORM_FIELDS if (values.get(k) or "").strip()]
    lines += [x.strip() for x in overrides.splitlines() if x.strip() and not x.strip().startswith("#")]
    extra, problems = parse_overrides(lines)
    if problems:
        raise ConfigError(problems, where="the run form")
    cfg = deep_merge({"tracking": {"tensorboard": False}}, extra)
    cfg = {"data": str(Path(data)), "output_dir": str(root / RUNS / name),  # always the form's, never an override's
           **{k: v for k, v in cfg.items() if k not in ("data", "output_dir")}}
    load_config(TrainConfig, overrides=[], base=cfg)  # the same validation as `homeforge train --config`
    return cfg, yaml.safe_dump(cfg, sort_keys=False)


class Runs:
    """Training processes this dashboard started (only these can be stopped from it)."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def config_file(self, name: str) -> Path:
        return self.root / RUNS / f"{name}.yaml"

    def running(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def start(self, name: str, yaml_text: str | None = None, resume: bool = False) -> subprocess.Popen:
        with self._lock:
            if self.running(name):
                raise HomeforgeError(f"run {name} is already training", fix="stop it first")
            cfg = self.config_file(name)
            if yaml_text is not None:
                if cfg.exists() or (self.root / RUNS / name).exists():
                    raise HomeforgeError(f"a run named {name} exists already", where=str(cfg),
                                         fix="choose another name, or resume that run from its page")
                (self.root / RUNS / name).mkdir(parents=True)  # listed (and its page shown) before the trainer starts
                cfg.write_text(yaml_text, encoding="utf-8")
            elif not cfg.is_file():
                raise HomeforgeError(f"run {name} was not started from the dashboard (no {cfg.name})",
                                     where=str(cfg), fix="resume it with `homeforge train --output RUN --resume latest`")
            cmd = [sys.executable, "-m", "homeforge", "train", "--config", str(cfg)]
            if resume:
                cmd += ["--resume", "latest"]
            log = open(self.root / RUNS / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
            try:
                proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            finally:
                log.close()
            self.procs[name] = proc
            return proc

    def stop(self, name: str) -> int:
        """SIGTERM: the trainer finishes its step, checkpoints it and exits (resumable)."""
        with self._lock:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                raise HomeforgeError(f"run {name} is not training (from this dashboard)", fix="reload the page")
            proc.send_signal(signal.SIGTERM)
            return proc.pid

    def log_tail(self, name: str, n: int = 30) -> str:
        f = self.root / RUNS / f"{name}.log"
        return "\n".join(f.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]) if f.is_file() else ""

    def close(self, grace: float = 10.0) -> None:
        """Stop what this dashboard started: SIGTERM (checkpoint and exit), SIGKILL after ``grace`` seconds."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- registry


def registry_view() -> list[dict]:
    """Every registered name with its versions (newest first), aliases and change history."""
    from homeforge.registry.store import Registry

    reg = Registry()
    out = []
    for name in reg.names():
        idx = reg.index(name)
        versions = []
        for v in reversed(idx["versions"]):
            ev = (v.get("eval") or {}).get("metrics", {})
            versions.append({"version": v["version"], "hash": v["content_hash"][:12], "registered": v["registered"],
                             "aliases": reg.aliases_of(name, v["version"]),
                             "metrics": {k: x for k, x in ev.items() if isinstance(x, (int, float))}})
        out.append({"name": name, "aliases": idx["aliases"], "versions": versions,
                    "history": list(reversed(idx.get("history", [])))[:20]})
    return out


def promote(name: str, src: str, dst: str, metric: str, min_improvement: float, p_value: float) -> dict:
    """The CLI's `registry promote`: the same gate object, the same store call (refusals raise GateRefused)."""
    from homeforge.pipeline.spec import PromoteGates
    from homeforge.registry.store import Registry

    gates = PromoteGates(metric=metric, min_improvement=min_improvement, p_value=p_value)
    return Registry().promote(name, src, dst, gates)


def rollback(name: str, alias: str) -> dict:
    from homeforge.registry.store import Registry

    return Registry().rollback(name, alias)


# --------------------------------------------------------------------------- playground


class Servers:
    """`homeforge serve registry:NAME@ALIAS` processes this dashboard started for the playground (loopback only,
    without keys, like `serve` on 127.0.0.1); their URLs join the playground's list."""

    def __init__(self, urls: list[str]):
        self.urls = urls
        self.procs: dict[str, tuple[subprocess.Popen, str]] = {}
        self._lock = threading.Lock()

    def start(self, ref: str) -> str:
        import socket
        import tempfile

        from homeforge.registry.store import Registry

        Registry().resolve(ref)  # an unknown name or alias fails here, in the words `serve` would use
        with self._lock:
            if ref in self.procs and self.procs[ref][0].poll() is None:
                return self.procs[ref][1]
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            url = f"http://127.0.0.1:{port}"
            log = tempfile.NamedTemporaryFile(prefix="homeforge-ui-serve-", suffix=".log", delete=False)  # noqa: SIM115
            try:
                proc = subprocess.Popen([sys.executable, "-m", "homeforge", "serve", f"registry:{ref}", "--host",
                                         "127.0.0.1", "--port", str(port), "require_keys=false"], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            finally:
                log.close()
            self.procs[ref] = (proc, url)
            self.urls.append(url)
            return url

    def running(self) -> dict[str, str]:
        return {ref: url for ref, (proc, url) in self.procs.items() if proc.poll() is None}

    def close(self, grace: float = 10.0) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()



def served_models(urls: list[str], api_key: str | None) -> list[dict]:
    """``[{"endpoint": i, "url", "model"}]`` from each server's /v1/models (a server that is down is listed as such)."""
    import httpx

    out = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for i, url in enumerate(urls):
        try:
            data = httpx.get(f"{url}/v1/models", headers=headers, timeout=5).json().get("data", [])
            out += [{"endpoint": i, "url": url, "model": d["id"], "version": d.get("version")} for d in data]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            out.append({"endpoint": i, "url": url, "model": None, "error": str(exc) or type(exc).__name__})
    return out

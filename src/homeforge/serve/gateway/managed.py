"""A managed upstream: an OpenAI-compatible server (``vllm serve``) started and stopped by the gateway.

The child listens on a free loopback port chosen here, writes its output to a log file,
runs offline (hub and telemetry switches off) in its own session (a Ctrl-C at the terminal
reaches the gateway, which drains and then stops the child), and dies with the gateway on
Linux even if the gateway is killed. The pool's health checks decide when it is ready;
``stop`` sends SIGTERM to its process group, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from homeforge.config import ServeConfig
from homeforge.errors import HomeforgeError

HOST = "127.0.0.1"
VLLM = ["vllm", "serve", "{model_dir}", "--host", "{host}", "--port", "{port}", "--served-model-name", "{model_name}"]
# vLLM reports usage statistics unless told not to; the hubs must not be asked for anything
QUIET_ENV = {"VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # in the child, before exec (Linux: PR_SET_PDEATHSIG)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass


class ManagedProcess:
    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, port: int, what: str):
        self.argv, self.env, self.log_path, self.port, self.what = argv, env, log_path, port, what
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        from homeforge.security.egress import OFFLINE_ENV

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        env = {**os.environ, **OFFLINE_ENV, **QUIET_ENV, **self.env}
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        except OSError as exc:
            self._log.close()
            raise HomeforgeError(f"cannot start {self.what}: {exc.strerror or exc}", where=self.argv[0],
                                 fix="check that the command is installed and on PATH") from None

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_bytes()[-4000:].decode("utf-8", "replace")
        except OSError:
            return ""
        return " | ".join(x.strip() for x in text.strip().splitlines()[-lines:])

    def exit_message(self) -> str:
        tail = self.tail()
        return (f"{self.what} exited with code {self.exited()}" + (f": {tail}" if tail else "")
                + f" (log: {self.log_path})")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the child's process group, SIGKILL after ``timeout`` seconds; idempotent."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log is not None:
            self._log.close()
            self._log = None


def managed_upstream(cfg: ServeConfig) -> tuple[ManagedProcess, str | None] | None:
    """The child to start for ``backend: vllm`` or ``gateway.command`` (with the key to reach it), or None."""
    gw = cfg.gateway
    if cfg.backend != "vllm" and not gw.command:
        return None
    from homeforge import paths

    name = cfg.model_name or (Path(cfg.model_dir).name if cfg.model_dir else "model")
    needs_dir = gw.command is None or any("{model_dir}" in a for a in gw.command)
    if needs_dir:
        from homeforge.models.io import check_model_dir

        check_model_dir(cfg.model_dir or "")
    env, key = {}, None
    if gw.command:
        template, what = list(gw.command), f"the upstream command `{gw.command[0]}`"
    else:
        if shutil.which("vllm") is None:
            raise HomeforgeError(
                "--backend vllm starts `vllm serve` behind the gateway, but the `vllm` command is not installed",
                fix="install vLLM on a GPU machine (pip install vllm) and run this there; or run vLLM on the GPU "
                    "machine yourself and put this gateway in front of it: homeforge serve --upstream "
                    "http://GPU-HOST:8000 with HOMEFORGE_ALLOW_HOSTS=GPU-HOST (docs/serving.md, 'Gateway'); "
                    "or serve on this CPU with --backend torch")
        template, what = list(VLLM), "vllm serve"
        key = secrets.token_urlsafe(32)  # only this gateway may use the child, not every local user
        env["VLLM_API_KEY"] = key
    port = free_port()
    values = {"port": str(port), "host": HOST, "model_dir": str(cfg.model_dir or ""), "model_name": name}
    argv = []
    for arg in template:
        for k, v in values.items():
            arg = arg.replace("{" + k + "}", v)
        argv.append(arg)
    argv += list(gw.extra_args)
    log = Path(gw.log_file).expanduser() if gw.log_file else paths.logs_dir() / f"upstream-{port}.log"
    return ManagedProcess(argv, env, log, port, what), key

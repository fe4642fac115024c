"""Run the dashboard: the same bind rule as `homeforge serve` (a non-loopback address needs API keys)."""

from __future__ import annotations

import signal
from pathlib import Path

from homeforge.errors import HomeforgeError


def check_bind(host: str, keys) -> None:
    from homeforge.serve.net import is_loopback

    if not is_loopback(host) and not keys.active():
        raise HomeforgeError(
            f"refusing to listen on {host} without API keys: anyone on the network could see and change everything",
            where=str(keys.path),
            fix="create a key first (`homeforge keys add --name me --role admin`), or bind to 127.0.0.1 or ::1")


def run(root: Path, host: str = "127.0.0.1", port: int = 8600, keys_file: Path | None = None,
        serve_urls: list[str] | None = None, serve_key: str | None = None, console=None) -> None:
    import uvicorn

    from homeforge.serve.app import uvicorn_server
    from homeforge.serve.auth import KeyStore
    from homeforge.serve.net import bind, url
    from homeforge.ui.app import UiState, create_app

    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise HomeforgeError(f"the root folder {root} does not exist", fix="pass --root DIR with your artifacts")
    keys = KeyStore.open(keys_file)
    check_bind(host, keys)
    for u in serve_urls or []:
        if not u.startswith(("http://", "https://")):
            raise HomeforgeError(f"--serve-url {u!r} is not an http(s) URL", fix="e.g. http://127.0.0.1:8000")
    st = UiState(root, keys, [u.rstrip("/") for u in serve_urls or []], serve_key)
    app = create_app(st)
    sock = bind(host, port)
    if console is not None:
        auth = f"log in with an API key ({len(keys.active())} active)" if keys.active() \
            else "no API keys: local access only, as admin"
        console.print(f"homeforge ui at {url(host, sock.getsockname()[1])} — {auth}; root {root}", highlight=False)
    # a SIGTERM/SIGINT stops the server without being re-raised, so the trainers and servers it started are
    # stopped below before this process ends
    server = uvicorn_server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        st.runs.close()
        st.servers.close()
        sock.close()
    if signal.SIGINT in server.stopped_by:
        raise KeyboardInterrupt

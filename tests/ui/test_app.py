"""The dashboard's guards without a browser: login, sessions, CSRF and origin checks, roles, paths kept
inside the root, the bind rule, live metrics read while being written, assets that fetch nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import resources

import pytest
from fastapi.testclient import TestClient

from homeforge.errors import HomeforgeError
from homeforge.serve.auth import KeyStore
from homeforge.ui.app import UiState, create_app
from homeforge.ui.server import check_bind


@pytest.fixture
def ui(tmp_path):
    root = tmp_path / "root"
    run = root / "exp" / "r1"
    run.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens_per_s": 1000.0, "mfu": None})
             for s in (10, 20, 30)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 40, "lo')  # the trainer mid-line
    store = KeyStore.open(tmp_path / "keys.json")
    tokens = {role: store.add(role, role)[1] for role in ("admin", "operator", "viewer")}
    st = UiState(root, store)
    return TestClient(create_app(st), follow_redirects=False), tokens, st


def login(client: TestClient, token: str) -> str:
    r = client.post("/login", data={"token": token, "next": "/runs"})
    assert r.status_code == 303 and r.headers["location"] == "/runs"
    page = client.get("/runs").text
    return re.search(r'data-csrf="([^"]+)"', page).group(1)


def test_login_sessions_and_roles(ui):
    client, tokens, st = ui
    assert client.get("/runs").headers["location"] == "/login?next=/runs"
    assert client.get("/api/metrics/exp/r1").status_code == 401
    bad = client.post("/login", data={"token": "hfk_nope_x"})
    assert bad.status_code == 401 and "invalid or revoked" in bad.text
    csrf = login(client, tokens["viewer"])
    page = client.get("/runs")
    assert page.status_code == 200 and "viewer" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert client.get("/security").status_code == 403 and client.get("/runs/new").status_code == 403
    # a viewer with a valid token still may not act
    assert client.post("/registry/promote", data={"name": "x", "csrf": csrf}).status_code == 403
    rows = client.get("/audit?event=ui-login-failed").text  # the audit page, filtered like `audit show --event`
    assert "ui-login-failed" in rows and "ui-refused" not in rows
    assert "ui-refused" in client.get("/audit?user=&event=ui-refused").text
    st.keys.revoke("viewer")  # the session ends with its key
    assert client.get("/runs").status_code == 303


def test_csrf_and_origin(ui):
    client, tokens, _ = ui
    csrf = login(client, tokens["admin"])
    assert client.post("/security/keys", data={"action": "add", "name": "x", "role": "viewer"}).status_code == 403
    other = client.post("/security/keys", data={"action": "add", "name": "x", "role": "viewer", "csrf": csrf},
                        headers={"Origin": "http://evil.example"})
    assert other.status_code == 403
    ok = client.post("/security/keys", data={"action": "add", "name": "x", "role": "viewer", "csrf": csrf})
    assert ok.status_code == 200 and re.search(r'id="new-token">hfk_', ok.text)
    assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    assert client.get("/runs").status_code == 303


def test_paths_stay_inside_the_root(ui):
    client, tokens, _ = ui
    login(client, tokens["viewer"])
    for url in ("/datasets/../../etc", "/api/metrics/..%2F..%2Fetc", "/plot/exp/r1?name=../../keys.json",
                "/runs/%2Fetc"):
        r = client.get(url)
        assert r.status_code in (400, 404), url
    assert "outside the dashboard's root" in client.get("/api/metrics/..%2F..").json()["error"]


def test_live_metrics_while_a_line_is_half_written(ui):
    client, tokens, st = ui
    login(client, tokens["viewer"])
    f = st.root / "exp" / "r1" / "metrics.jsonl"
    m = client.get("/api/metrics/exp/r1").json()
    assert m["records"] == 3 and [p[0] for p in m["curves"]["loss"]] == [10, 20, 30] and m["curves"]["mfu"] == []
    assert m["offset"] == f.read_bytes().rfind(b"\n") + 1  # the half line waits for the next poll
    again = client.get(f"/api/metrics/exp/r1?offset={m['offset']}&inode={m['inode']}").json()
    assert again["records"] == 0 and again["offset"] == m["offset"] and not again["reset"]
    with open(f, "a") as fh:  # the trainer finishes the line and writes another
        fh.write('ss": 1.0}\n{"step": 50, "loss": 0.5}\n')
    more = client.get(f"/api/metrics/exp/r1?offset={m['offset']}&inode={m['inode']}").json()
    assert more["records"] == 2 and [p[0] for p in more["curves"]["loss"]] == [40, 50]
    # a resumed run rewrites the file (a new inode): read again from the start, the page told to reset
    from homeforge._fs import atomic_write_text

    atomic_write_text(f, '{"step": 10, "loss": 4.0}\n')
    redo = client.get(f"/api/metrics/exp/r1?offset={more['offset']}&inode={more['inode']}").json()
    assert redo["reset"] and redo["records"] == 1
    page = client.get("/compare?ids=exp/r1&ids=exp/r1").text
    assert 'data-compare="[&#34;exp/r1&#34;, &#34;exp/r1&#34;]"' in page and page.count('href="/runs/exp/r1"') == 2


def test_verify_button_finds_a_changed_file(ui):
    from homeforge import artifacts

    client, tokens, st = ui
    with artifacts.write_artifact(st.root / "notes", stage="prepare", config={"x": 1}) as art:
        (art.dir / "shard.bin").write_bytes(b"\x00" * 64)
    csrf = login(client, tokens["operator"])
    ok = client.post("/verify", data={"rel": "notes", "csrf": csrf})
    assert ok.status_code == 200 and "every check passed" in ok.text
    blob = st.root / "notes" / "shard.bin"
    blob.chmod(0o644)
    blob.write_bytes(b"\x01" + b"\x00" * 63)  # one flipped byte, same size
    bad = client.post("/verify", data={"rel": "notes", "csrf": csrf})
    assert bad.status_code == 409 and "MISMATCH" in bad.text and "shard.bin" in bad.text


def test_encrypted_dataset_shown_as_such(tmp_path, monkeypatch):
    from homeforge import artifacts
    from homeforge.security import keys

    monkeypatch.setenv("HOMEFORGE_HOME", str(tmp_path / "home"))
    for var in ("HOMEFORGE_KEY", "HOMEFORGE_KEY_FILE", "HOMEFORGE_KEY_COMMAND", "HOMEFORGE_ENCRYPT"):
        monkeypatch.delenv(var, raising=False)
    key = keys.init_key()
    root = tmp_path / "root"
    with artifacts.write_artifact(root / "secret", stage="prepare", config={}, encrypt=True) as art:
        (art.dir / "report.json").write_text(json.dumps({"kind": "text", "records": {"in": 5, "out": 4,
                                                          "dropped": {"too_short": 1}, "splits": {"train": 4}}}))
        (art.dir / "train.bin").write_bytes(b"\x01" * 32)
    client = TestClient(create_app(UiState(root, KeyStore.open(tmp_path / "none.json"))), follow_redirects=False)
    assert f"yes ({key.key_id})" in client.get("/datasets").text
    page = client.get("/datasets/secret").text
    assert f"encrypted at rest, key {key.key_id}" in page and "too_short" in page


def test_no_keys_means_local_admin(tmp_path, monkeypatch):
    st = UiState(tmp_path, KeyStore.open(tmp_path / "none.json"))
    client = TestClient(create_app(st), follow_redirects=False)
    r = client.get("/audit")
    assert r.status_code == 200 and "local · admin" in r.text
    from homeforge.ui import sessions

    monkeypatch.setattr(sessions, "MAX_SESSIONS", 20)
    for _ in range(50):  # clients that never keep the cookie do not grow the server's memory without bound
        client.cookies.clear()
        client.get("/runs")
    assert len(st.sessions._by_id) <= 20


def test_bind_needs_keys_off_loopback(tmp_path):
    empty = KeyStore.open(tmp_path / "none.json")
    check_bind("127.0.0.1", empty)
    check_bind("::1", empty)
    with pytest.raises(HomeforgeError, match="without API keys"):
        check_bind("0.0.0.0", empty)
    r = subprocess.run([sys.executable, "-m", "homeforge", "ui", "--host", "0.0.0.0", "--root", str(tmp_path),
                        "--keys-file", str(tmp_path / "none.json"), "--port", "0"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "refusing to listen on 0.0.0.0 without API keys" in r.stderr
    assert "Traceback" not in r.stderr
    from homeforge.ui.server import run

    with pytest.raises(HomeforgeError, match="does not exist"):
        run(tmp_path / "nowhere", keys_file=tmp_path / "none.json")
    with pytest.raises(HomeforgeError, match="not an http"):
        run(tmp_path, keys_file=tmp_path / "none.json", serve_urls=["ftp://127.0.0.1"])


def test_assets_fetch_nothing_from_elsewhere():
    """No CDN, no web font, no remote URL in what the pages load (the SVG namespace is a name, not a fetch)."""
    root = resources.files("homeforge.ui")
    texts = {f.name: f.read_text() for d in ("templates", "static") for f in (root / d).iterdir()}
    assert {"ui.js", "ui.css", "base.html"} <= set(texts)
    for name, text in texts.items():
        remote = [u for u in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text)
                  if not u.startswith("http://www.w3.org/2000/svg")]
        assert not remote, (name, remote)
        assert "@import" not in text and "@font-face" not in text and "url(" not in text, name

"""The dashboard's web application: login, pages, the small JSON API the script polls, the actions.

Every page is rendered on the server from the package's templates; the only script is
``static/ui.js`` (charts, polling, streaming chat). Pages need a session (``sessions.py``);
every POST needs the session's CSRF token and a same-origin ``Origin`` when the browser sends one.
Responses carry a strict Content-Security-Policy: the page may load nothing but this server's own files.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Query, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles

from homeforge.errors import HomeforgeError
from homeforge.serve.auth import KeyStore
from homeforge.ui import actions, catalog
from homeforge.ui.sessions import COOKIE, Session, Sessions, csrf_ok

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
PAGES = (("datasets", "Datasets", "viewer"), ("runs", "Runs", "viewer"), ("models", "Evaluations & models", "viewer"),
         ("playground", "Playground", "operator"), ("audit", "Audit", "viewer"), ("security", "Keys & roles", "admin"))


@dataclass
class UiState:
    root: Path
    keys: KeyStore
    serve_urls: list[str] = field(default_factory=list)
    serve_key: str | None = None

    def __post_init__(self):
        self.sessions = Sessions(self.keys)
        self.runs = actions.Runs(self.root)
        self.servers = actions.Servers(self.serve_urls)


class Refused(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def _templates():
    import jinja2

    folder = resources.files("homeforge.ui") / "templates"
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["tojson_attr"] = lambda v: json.dumps(v, default=str)
    env.filters["num"] = lambda v: (f"{v:.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else v)
    return env


def create_app(st: UiState) -> FastAPI:
    app = FastAPI(title="homeforge ui", docs_url=None, redoc_url=None, openapi_url=None)
    env = _templates()
    static = resources.files("homeforge.ui") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    app.state.ui = st

    @app.middleware("http")
    async def guard(request: Request, call_next):
        sess = st.sessions.get(request.cookies.get(COOKIE))
        new = None
        if sess is None and not st.sessions.keys_required():
            sess = new = st.sessions.local()
        request.state.session = sess
        if request.method == "POST" and request.url.path != "/login":
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                return _plain(403, f"cross-origin request from {origin} refused")
        response = await call_next(request)
        if new is not None:
            _set_cookie(response, new)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"  # (no-referrer would make Chromium send Origin: null)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        if exc.status == 401:
            if request.url.path.startswith("/api/") or request.method == "POST":
                return _plain(401, exc.message)
            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        return page(request, "error.html", status=exc.status, title="Refused", message=exc.message)

    @app.exception_handler(HomeforgeError)
    async def bad_input(request: Request, exc: HomeforgeError):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.render()}, status_code=400)
        return page(request, "error.html", status=400, title="Error", message=exc.render())

    def page(request: Request, template: str, status: int = 200, **ctx) -> HTMLResponse:
        sess: Session | None = request.state.session
        nav = [(p, label) for p, label, role in PAGES if sess is not None and sess.may(role)]
        html = env.get_template(template).render(session=sess, nav=nav, path=request.url.path, root=str(st.root),
                                                 keys_required=st.sessions.keys_required(), **ctx)
        return HTMLResponse(html, status_code=status)

    def need(request: Request, role: str = "viewer") -> Session:
        sess: Session | None = request.state.session
        if sess is None:
            raise Refused(401, "log in first")
        if not sess.may(role):
            actions.audit("refused", sess, path=request.url.path, needs=role)
            raise Refused(403, f"your role ({sess.role}) may not open {request.url.path}: it needs {role}")
        return sess

    async def form_of(request: Request, role: str) -> tuple[Session, dict]:
        sess = need(request, role)
        form = dict(await request.form())
        if not csrf_ok(sess, form.get("csrf") or request.headers.get("x-csrf-token")):
            raise Refused(403, "the form's CSRF token is missing or wrong: reload the page and try again")
        return sess, form

    # ----------------------------------------------------------------- login

    @app.get("/login")
    def login_page(request: Request, next: str = "/"):
        return page(request, "login.html", title="Log in", next=_local(next), error=None)

    @app.post("/login")
    async def login(request: Request):
        form = dict(await request.form())
        nxt = _local(str(form.get("next") or "/"))
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            return _plain(403, "cross-origin login refused")
        sess = st.sessions.login(str(form.get("token") or ""))
        if sess is None:
            actions.audit("login-failed", None, remote=request.client.host if request.client else None)
            await asyncio.sleep(0.5)  # a little friction for guessing (a 256-bit token is not guessable anyway)
            return page(request, "login.html", status=401, title="Log in", next=nxt,
                        error="invalid or revoked API key")
        actions.audit("login", sess, remote=request.client.host if request.client else None)
        resp = RedirectResponse(nxt, status_code=303)
        _set_cookie(resp, sess)
        return resp

    @app.post("/logout")
    async def logout(request: Request):
        sess, _ = await form_of(request, "viewer")
        st.sessions.drop(sess.id)
        actions.audit("logout", sess)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    @app.get("/favicon.ico")
    def favicon():
        return FileResponse(str(static / "favicon.svg"), media_type="image/svg+xml")

    @app.get("/")
    def home(request: Request):
        need(request)
        return RedirectResponse("/datasets", status_code=303)

    # ----------------------------------------------------------------- datasets

    @app.get("/datasets")
    def datasets(request: Request):
        need(request)
        items = catalog.of_stage(catalog.scan(st.root), "prepare", "broken")
        return page(request, "datasets.html", title="Datasets", items=items)

    @app.get("/datasets/{rel:path}")
    def dataset(request: Request, rel: str):
        need(request)
        return page(request, "dataset.html", title=f"Dataset {rel}", d=catalog.dataset(st.root, rel))

    @app.get("/plot/{rel:path}")
    def plot(request: Request, rel: str, name: str):
        need(request)
        return FileResponse(catalog.plot_file(st.root, rel, name), media_type="image/png")

    @app.post("/verify")
    async def verify(request: Request):
        """`homeforge verify ARTIFACT --allow-missing-inputs`: the seal, every file, the recorded inputs, recursively."""
        sess, form = await form_of(request, "operator")
        from homeforge.security.provenance import verify_tree

        rel = str(form.get("rel", ""))
        checks = verify_tree(catalog.find(st.root, rel), allow_missing=True)
        ok = all(c.ok for c in checks)
        actions.audit("verify", sess, artifact=rel, ok=ok, checks=len(checks))
        return page(request, "verify.html", status=200 if ok else 409, title=f"Provenance of {rel}", rel=rel,
                    checks=checks, ok=ok)

    # ----------------------------------------------------------------- runs

    @app.get("/runs")
    def runs(request: Request):
        need(request)
        items = catalog.of_stage(catalog.scan(st.root), "run")
        return page(request, "runs.html", title="Runs", items=items, running={i.id for i in items
                    if st.runs.running(Path(i.id).name)})

    @app.get("/runs/new")
    def new_run(request: Request):
        need(request, "operator")
        data = catalog.of_stage(catalog.scan(st.root), "prepare")
        return page(request, "new_run.html", title="New run", datasets=data, error=None, values={})

    @app.post("/runs/new")
    async def start_run(request: Request):
        sess, form = await form_of(request, "operator")
        name, data = str(form.get("name", "")), str(form.get("data", ""))
        try:
            data_dir = catalog.find(st.root, data)
            _, text = actions.run_config(st.root, name, str(data_dir), {k: str(form.get(k, "")) for k in actions.FORM_FIELDS},
                                         str(form.get("overrides", "")))
            proc = st.runs.start(name, text)
        except HomeforgeError as exc:
            return page(request, "new_run.html", status=400, title="New run", error=exc.render(), values=form,
                        datasets=catalog.of_stage(catalog.scan(st.root), "prepare"))
        actions.audit("run-start", sess, run=name, trainer_pid=proc.pid, config=text)
        return RedirectResponse(f"/runs/{actions.RUNS}/{name}", status_code=303)

    @app.post("/runs/control")
    async def control_run(request: Request):
        sess, form = await form_of(request, "operator")
        name, what = str(form.get("name", "")), form.get("action")
        if what == "stop":
            pid = st.runs.stop(name)
        elif what == "resume":
            pid = st.runs.start(name, resume=True).pid
        else:
            raise HomeforgeError(f"unknown action {what!r}", fix="stop or resume")
        actions.audit(f"run-{what}", sess, run=name, trainer_pid=pid)
        return RedirectResponse(f"/runs/{actions.RUNS}/{name}", status_code=303)

    @app.get("/compare")
    def compare(request: Request, ids: Annotated[list[str] | None, Query()] = None):
        need(request)
        ids = [i for i in (ids or []) if i][:6]
        runs_ = [catalog.run(st.root, i) for i in ids]
        return page(request, "compare.html", title="Compare runs", runs=runs_, ids=ids)

    @app.get("/runs/{rel:path}")
    def run_page(request: Request, rel: str):
        need(request)
        r = catalog.run(st.root, rel)
        name = Path(rel).name
        own = rel == f"{actions.RUNS}/{name}"
        cfg = st.runs.config_file(name)
        return page(request, "run.html", title=f"Run {rel}", r=r, name=name, own=own,
                    running=st.runs.running(name), log=st.runs.log_tail(name) if own else "",
                    config_yaml=cfg.read_text(encoding="utf-8") if own and cfg.is_file() else None,
                    config_path=str(cfg))

    @app.get("/api/metrics/{rel:path}")
    def api_metrics(request: Request, rel: str, offset: int = 0, inode: int | None = None):
        """New records since byte ``offset`` of metrics.jsonl (each poll reads only what was appended)."""
        need(request)
        p = catalog.find(st.root, rel)
        new = catalog.metrics_after(p, offset, inode)
        name = Path(rel).name
        running = st.runs.running(name) if rel == f"{actions.RUNS}/{name}" else None
        return JSONResponse({"offset": new["offset"], "inode": new["inode"], "reset": new["reset"],
                             "records": len(new["records"]), "curves": catalog.curves(new["records"]),
                             "running": running, "finished": (p / "model" / "homeforge.json").is_file(),
                             "active": bool(running) or catalog.recently_written(p)})

    # ----------------------------------------------------------------- evaluations, registry, exports

    @app.get("/models")
    def models(request: Request):
        need(request)
        items = catalog.scan(st.root)
        return page(request, "models.html", title="Evaluations & models", evals=catalog.of_stage(items, "eval"),
                    exports=catalog.of_stage(items, "export-*", "compress", "import-gguf"),
                    trained=catalog.of_stage(items, "train"), registry=actions.registry_view(), message=None)

    @app.get("/evals/{rel:path}")
    def eval_page(request: Request, rel: str):
        need(request)
        return page(request, "eval.html", title=f"Evaluation {rel}", e=catalog.evaluation(st.root, rel))

    @app.post("/registry/{what}")
    async def registry_action(request: Request, what: str):
        sess, form = await form_of(request, "operator")
        name = str(form.get("name", ""))
        try:
            if what == "promote":
                res = actions.promote(name, str(form.get("src") or "candidate"), str(form.get("dst") or "champion"),
                                      str(form.get("metric") or "perplexity"),
                                      float(form.get("min_improvement") or 0), float(form.get("p_value") or 0.01))
                message = res["message"]
            elif what == "rollback":
                res = actions.rollback(name, str(form.get("alias") or "champion"))
                message = f"{name}@{res['alias']} -> version {res['version']} (was {res['previous']})"
            else:
                raise HomeforgeError(f"unknown registry action {what!r}", fix="promote or rollback")
            ok = True
        except HomeforgeError as exc:
            message, ok = exc.render(), False
        actions.audit(f"registry-{what}", sess, name=name, ok=ok, message=message)
        items = catalog.scan(st.root)
        return page(request, "models.html", status=200 if ok else 409, title="Evaluations & models",
                    evals=catalog.of_stage(items, "eval"), exports=catalog.of_stage(items, "export-*", "compress"),
                    trained=catalog.of_stage(items, "train"), registry=actions.registry_view(),
                    message={"ok": ok, "text": message})

    # ----------------------------------------------------------------- playground

    @app.get("/playground")
    def playground(request: Request):
        need(request, "operator")
        return page(request, "playground.html", title="Playground", started=st.servers.running(),
                    models=actions.served_models(st.serve_urls, st.serve_key), registry=actions.registry_view())

    @app.post("/playground/serve")
    async def serve_version(request: Request):
        sess, form = await form_of(request, "operator")
        ref = str(form.get("ref", ""))
        url = st.servers.start(ref)
        actions.audit("serve-start", sess, ref=ref, url=url)
        return RedirectResponse("/playground", status_code=303)

    @app.post("/api/chat")
    async def chat(request: Request):
        sess = need(request, "operator")
        if not csrf_ok(sess, request.headers.get("x-csrf-token")):
            raise Refused(403, "CSRF token missing or wrong")
        body = await request.json()
        i = int(body.get("endpoint", 0))
        if not 0 <= i < len(st.serve_urls):
            raise HomeforgeError(f"no server number {i}", fix="pick a model from the list")
        payload = {"model": body.get("model"), "messages": body.get("messages", []), "stream": True,
                   "max_tokens": min(int(body.get("max_tokens") or 64), 1024),
                   "temperature": float(body.get("temperature") or 0)}
        actions.audit("chat", sess, endpoint=st.serve_urls[i], model=payload["model"],
                      messages=len(payload["messages"]))
        return StreamingResponse(_relay(f"{st.serve_urls[i]}/v1/chat/completions", payload, st.serve_key),
                                 media_type="text/event-stream")

    # ----------------------------------------------------------------- audit and security

    @app.get("/audit")
    def audit_page(request: Request, user: str = "", event: str = "", command: str = "", since: str = "",
                   until: str = "", artifact: str = "", limit: int = 200):
        need(request)
        from homeforge.security import audit as audit_log

        verify = audit_log.verify() if audit_log.default_path().is_file() else None
        try:
            rows = audit_log.show(since=since or None, until=until or None, user=user or None, command=command or None,
                                  event=event or None, artifact=artifact or None)
        except audit_log.AuditError as exc:
            rows, verify = [], verify or exc.render()
        filters = {"user": user, "event": event, "command": command, "since": since, "until": until,
                   "artifact": artifact}
        return page(request, "audit.html", title="Audit", rows=list(reversed(rows))[:max(1, min(limit, 2000))],
                    total=len(rows), verify=verify, filters=filters, path_=str(audit_log.default_path()))

    @app.get("/security")
    def security(request: Request):
        need(request, "admin")
        st.keys.reload_if_changed()
        return page(request, "security.html", title="Keys & roles", keys=[k.public() for k in st.keys.keys.values()],
                    new_token=None, keys_file=str(st.keys.path))

    @app.post("/security/keys")
    async def keys_action(request: Request):
        sess, form = await form_of(request, "admin")
        new_token = None
        if form.get("action") == "add":
            key, new_token = st.keys.add(str(form.get("name", "")), str(form.get("role", "")))
            actions.audit("key-add", sess, id=key.id, name=key.name, key_role=key.role)
        elif form.get("action") == "revoke":
            key = st.keys.revoke(str(form.get("id", "")))
            actions.audit("key-revoke", sess, id=key.id, name=key.name)
        st.keys.reload_if_changed()
        return page(request, "security.html", title="Keys & roles", keys=[k.public() for k in st.keys.keys.values()],
                    new_token=new_token, keys_file=str(st.keys.path))

    return app


async def _relay(url: str, payload: dict, api_key: str | None):
    """The server's SSE stream, passed through line by line (an error becomes one ``error`` event)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=5)) as client:
            async with client.stream("POST", url, json=payload, headers=headers) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")[:500]
                    yield f"data: {json.dumps({'error': f'{r.status_code}: {text}'})}\n\n"
                    return
                async for line in r.aiter_lines():
                    if line:
                        yield line + "\n\n"
    except httpx.HTTPError as exc:
        yield f"data: {json.dumps({'error': str(exc) or type(exc).__name__})}\n\n"


def _local(path: str) -> str:
    """Only a path on this server (no open redirect to another site)."""
    return path if path.startswith("/") and not path.startswith("//") else "/"


def _plain(status: int, text: str) -> Response:
    return Response(text, status_code=status, media_type="text/plain")


def _set_cookie(resp: Response, sess: Session) -> None:
    resp.set_cookie(COOKIE, sess.id, httponly=True, samesite="strict", path="/")

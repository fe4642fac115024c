"""`homeforge chat`: an interactive terminal chat, streaming tokens, against a local model
(in-process engine) or a running `homeforge serve` (or any OpenAI-compatible server)."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator


class LocalChat:
    """The serving engine in this process: same batching code, same stop rules as the server."""

    def __init__(self, model_dir: str, threads: int | None = None):
        import torch

        from homeforge.config import ServeConfig
        from homeforge.errors import HomeforgeError
        from homeforge.serve.state import ServerState

        if threads:
            torch.set_num_threads(threads)
        self.state = ServerState(ServeConfig(model_dir=model_dir, max_batch_size=1), keys=_NoKeys())
        self.state.load()
        if self.state.load_error:
            raise HomeforgeError(self.state.load_error)
        if self.state.kind != "causal":
            raise HomeforgeError(f"{model_dir} is a {self.state.kind} model; chat needs a causal LM",
                                 fix="classify texts through `homeforge serve` and POST /v1/classifications")
        if not getattr(self.state.tok, "chat_template", None):
            raise HomeforgeError(f"{model_dir} has no chat template", where=model_dir,
                                 fix="use `homeforge generate` for plain text continuation")

    def stream(self, messages: list[dict], max_tokens: int, temperature: float, top_p: float,
               seed: int | None) -> Iterator[str]:
        from homeforge.serve.engine import Delta, Finish, GenRequest

        st = self.state
        text = st.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = st.tok(text, add_special_tokens=False)["input_ids"]
        ctx = st.max_context
        ids = ids[-(ctx - 1):]  # keep the most recent turns that fit
        q: queue.Queue = queue.Queue()
        req = GenRequest(ids, max(1, min(max_tokens, ctx - len(ids))), q.put, temperature=temperature, top_p=top_p,
                         seed=seed, stop_ids=st.stop_ids(chat=True))
        st.engine.submit([req])
        try:
            while True:
                ev = q.get()
                if isinstance(ev, Delta):
                    if ev.text:
                        yield ev.text
                elif isinstance(ev, Finish):
                    return
        finally:
            req.cancel()

    def close(self) -> None:
        self.state.engine.shutdown(drain=False)


class RemoteChat:
    """A running server, through /v1/chat/completions with ``stream: true``."""

    def __init__(self, url: str, api_key: str | None, model: str | None):
        import httpx

        from homeforge.errors import HomeforgeError

        self.url = url.rstrip("/")
        if not self.url.endswith("/v1"):
            self.url += "/v1"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=httpx.Timeout(600, connect=5))
        try:
            r = self.client.get(self.url + "/models", headers=self.headers)
        except httpx.HTTPError as exc:
            raise HomeforgeError(f"cannot reach the server at {self.url}: {exc}",
                                 fix="start it with `homeforge serve MODEL_DIR`, or check --url") from None
        if r.status_code != 200:
            raise HomeforgeError(f"the server refused: {_message(r)}", where=self.url,
                                 fix="pass a valid key with --api-key (or HOMEFORGE_API_KEY)")
        data = r.json().get("data") or []
        self.model = model or (data[0]["id"] if data else None)

    def stream(self, messages, max_tokens, temperature, top_p, seed) -> Iterator[str]:
        from homeforge.errors import HomeforgeError

        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed, "stream": True}
        with self.client.stream("POST", self.url + "/chat/completions", json=body, headers=self.headers) as r:
            if r.status_code != 200:
                r.read()
                raise HomeforgeError(f"the server answered {r.status_code}: {_message(r)}", where=self.url)
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for c in chunk.get("choices", []):
                    piece = (c.get("delta") or {}).get("content")
                    if piece:
                        yield piece

    def close(self) -> None:
        self.client.close()


def _message(r) -> str:
    try:
        return r.json()["error"]["message"]
    except Exception:
        return r.text[:200]


class _NoKeys:
    """Local chat needs no API keys."""

    path = None

    def active(self):
        return []

    def reload_if_changed(self):
        pass


def repl(backend, console, system: str | None, max_tokens: int, temperature: float, top_p: float,
         seed: int | None) -> None:
    """Read a line, stream the answer; `/reset` clears the history, `/exit` or Ctrl-D quits."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    console.print("[dim]type a message; /reset clears the conversation, /exit or Ctrl-D quits[/]")
    while True:
        try:
            line = console.input("[bold green]you>[/] ")
        except EOFError:
            console.print()
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = history[:1] if system else []
            console.print("[dim]conversation cleared[/]")
            continue
        history.append({"role": "user", "content": line})
        console.print("[bold cyan]model>[/] ", end="")
        answer = ""
        try:
            for piece in backend.stream(history, max_tokens, temperature, top_p, seed):
                answer += piece
                console.out(piece, end="", highlight=False)
        except KeyboardInterrupt:
            console.print("[dim] (stopped)[/]")
        console.print()
        history.append({"role": "assistant", "content": answer})

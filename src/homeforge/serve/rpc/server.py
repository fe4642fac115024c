"""gRPC (``homeforge.v1.Inference``) over the same driver, keys, limits and audit as the HTTP API.

Each call goes through ``serve.calls`` exactly as an HTTP request does: the key from the
metadata ``authorization: Bearer KEY`` and the role and request limits of the equivalent
HTTP route; the message converted to the HTTP request's fields and validated by the same
strict schemas (a refused value is INVALID_ARGUMENT naming the field); the same driver,
ledger and token accounting; one audit line (``transport: grpc``) and the same metrics,
labelled with the gRPC method. The server runs on the HTTP server's event loop (started and
stopped by the app's lifespan), so both share the driver without threads in between.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
from pydantic import ValidationError

from homeforge.errors import HomeforgeError
from homeforge.serve import calls
from homeforge.serve.driver import Done, Piece
from homeforge.serve.errors import ApiError, validation_error
from homeforge.serve.middleware import MAX_BODY_BYTES
from homeforge.serve.protocol import (
    ChatRequest,
    ClassificationRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from homeforge.serve.rpc import inference_pb2 as pb
from homeforge.serve.rpc import inference_pb2_grpc as pb_grpc
from homeforge.serve.state import ServerState

SERVICE = "/homeforge.v1.Inference/"
ROUTE = {"Complete": "/v1/completions", "Chat": "/v1/chat/completions", "Embed": "/v1/embeddings",
         "Classify": "/v1/classifications", "ListModels": "/v1/models"}
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
         413: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
         500: grpc.StatusCode.INTERNAL, 502: grpc.StatusCode.UNAVAILABLE, 503: grpc.StatusCode.UNAVAILABLE,
         504: grpc.StatusCode.DEADLINE_EXCEEDED}


def to_dict(msg) -> dict:
    """The fields a message sets (proto3 presence: optional fields when set, others when not default)."""
    out = {}
    for fd, value in msg.ListFields():
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            out[fd.name] = dict(value)
        elif fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED:
            out[fd.name] = [to_dict(v) if fd.message_type is not None else v for v in value]
        elif fd.message_type is not None:
            out[fd.name] = to_dict(value)
        else:
            out[fd.name] = value
    return out


def validate(schema, data: dict):
    """The HTTP schema's strict validation; an ApiError(400) naming the field when it refuses."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = validation_error(list(exc.errors()))
        raise ApiError(400, message, param=param) from None


def _request(method: str, msg):
    d = to_dict(msg)
    if method == "Complete":
        if "prompt_ids" in d:
            d["prompt"] = d.pop("prompt_ids").get("ids", [])
        return validate(CompletionRequest, {**d, "stream": True})
    if method == "Chat":
        return validate(ChatRequest, {**d, "stream": True})
    if method == "Embed":
        if "input_ids" in d:
            d["input"] = [t.get("ids", []) for t in d.pop("input_ids")]
        return validate(EmbeddingRequest, d)
    return validate(ClassificationRequest, d)


def _logprobs(items) -> list:
    return [pb.TokenLogprob(token=t.token, logprob=t.logprob,
                            top=[pb.TopLogprob(token=s, logprob=v) for s, v in (t.top or [])]) for t in items or []]


class _Call:
    """One RPC's facts for ``serve.calls``: key, role, model, tokens, ledger; recorded once at the end."""

    def __init__(self, st: ServerState, method: str, context):
        self.st, self.context, self.status = st, context, 200
        self.route, self.path = SERVICE + method, ROUTE[method]
        self.info: dict = {}
        self.t0 = time.perf_counter()
        # read now: grpc.aio may crash the process (SIGSEGV) when a finished or cancelled
        # call's context is asked for its peer
        self.peer = context.peer() or None

    def authorize(self) -> None:
        meta = {k.lower(): v for k, v in (self.context.invocation_metadata() or ()) if isinstance(v, str)}
        try:
            refusal = calls.authorize(self.st, self.path, meta.get("authorization", ""), self.info)
        except HomeforgeError as exc:  # e.g. a key file edited into invalid JSON
            refusal = ApiError(500, f"cannot check the API key: {exc.what}", "server_error")
        if refusal is not None:
            raise refusal

    async def refuse(self, exc: ApiError):
        self.status = exc.status
        meta = [(k, str(v)) for k, v in (("param", exc.param), ("code", exc.code)) if v]
        meta += [("retry-after", str(v)) for k, v in (exc.headers or {}).items() if k.lower() == "retry-after"]
        text = f"{exc.param}: {exc.message}" if exc.param and not exc.message.startswith(exc.param) else exc.message
        await self.context.abort(CODES.get(exc.status, grpc.StatusCode.UNKNOWN), text, trailing_metadata=tuple(meta))

    def record(self) -> None:
        calls.record(self.st, self.info, self.route, "GRPC", self.status, time.perf_counter() - self.t0, self.peer,
                     transport="grpc")


class Servicer(pb_grpc.InferenceServicer):
    def __init__(self, state: ServerState):
        self.st = state

    async def _generate(self, method: str, msg, context):
        call, gen = _Call(self.st, method, context), None
        try:
            call.authorize()
            body = _request(method, msg)
            gen, name, choices = await calls.start_generation(self.st, call.info, body, call.route)
            cid = f"{'chatcmpl' if method == 'Chat' else 'cmpl'}-{uuid.uuid4().hex}"
            finished = 0
            async for ev in gen.events(lambda: _cancelled(context)):
                if isinstance(ev, Piece):
                    yield pb.GenerateChunk(id=cid, model=name, index=ev.index, text=ev.text,
                                           logprobs=_logprobs(ev.logprobs), prompt=ev.prompt)
                elif isinstance(ev, Done):
                    finished += 1
                    yield pb.GenerateChunk(id=cid, model=name, index=ev.index, finish_reason=ev.reason,
                                           error=ev.error or "")
            if finished == choices:
                led = gen.ledger
                yield pb.GenerateChunk(id=cid, model=name, usage=pb.Usage(
                    prompt_tokens=led.prompt_tokens, completion_tokens=led.completion_tokens,
                    total_tokens=led.total_tokens))
            else:
                call.status = 499  # the client went away
        except ApiError as exc:
            await call.refuse(exc)
        except Exception as exc:
            await call.refuse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))
        except asyncio.CancelledError:
            call.status = 499
            raise
        finally:
            if gen is not None:
                calls.release(gen)
            call.record()

    async def _unary(self, method: str, msg, context, answer):
        call = _Call(self.st, method, context)
        try:
            call.authorize()
            return await answer(call)
        except ApiError as exc:
            await call.refuse(exc)
        except Exception as exc:
            await call.refuse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))
        finally:
            call.record()

    # ------------------------------------------------------------------ the RPCs

    async def Complete(self, request, context):  # noqa: N802 (names from the .proto)
        async for chunk in self._generate("Complete", request, context):
            yield chunk

    async def Chat(self, request, context):  # noqa: N802
        async for chunk in self._generate("Chat", request, context):
            yield chunk

    async def Embed(self, request, context):  # noqa: N802
        async def answer(call):
            r = await calls.embed(self.st, call.info, _request("Embed", request))
            return pb.EmbedResponse(model=r["model"], usage=pb.Usage(**r["usage"]), data=[
                pb.Embedding(index=d["index"], embedding=d["embedding"]) for d in r["data"]])

        return await self._unary("Embed", request, context, answer)

    async def Classify(self, request, context):  # noqa: N802
        async def answer(call):
            r = await calls.classify(self.st, call.info, _request("Classify", request))
            return pb.ClassifyResponse(model=r["model"], usage=pb.Usage(**r["usage"]), data=[
                pb.Classification(index=d["index"], label=d["label"], score=d["score"], scores=d["scores"])
                for d in r["data"]])

        return await self._unary("Classify", request, context, answer)

    async def ListModels(self, request, context):  # noqa: N802
        async def answer(call):
            return pb.ListModelsResponse(data=[
                pb.Model(id=m["id"], owned_by=m.get("owned_by", ""), created=int(m.get("created") or 0),
                         max_model_len=int(m.get("max_model_len") or 0)) for m in self.st.driver.models()])

        return await self._unary("ListModels", request, context, answer)


async def _cancelled(context) -> bool:
    return context.cancelled()


def _address(host: str, port: int) -> str:
    from homeforge.serve.net import normalize_host

    h = normalize_host(host) or "0.0.0.0"
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


def reserve_port(host: str, port: int) -> int:
    """Check that gRPC can listen on ``host``:``port`` now (0: pick a free port); the port to use."""
    from homeforge.serve.net import bind

    try:
        sock = bind(host, port)
    except HomeforgeError as exc:
        raise HomeforgeError(f"gRPC: {exc.what}", fix="choose another --grpc-port, or stop the program that uses it") from None
    with sock:
        return sock.getsockname()[1]


async def start_grpc(st: ServerState):
    """Start the gRPC server on the running event loop; ``st.grpc_port`` is the bound port."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_BODY_BYTES),
                                      ("grpc.max_send_message_length", MAX_BODY_BYTES)])
    pb_grpc.add_InferenceServicer_to_server(Servicer(st), server)
    addr = _address(st.cfg.host, st.cfg.grpc_port or 0)
    try:
        port = server.add_insecure_port(addr)
    except RuntimeError as exc:
        raise HomeforgeError(f"gRPC cannot listen on {addr}: {exc}", fix="choose another --grpc-port") from None
    await server.start()
    st.grpc_port = port
    return server

"""A gateway request (``GatewayJob``) and what an upstream's refusal means (``Refusal``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from homeforge.serve.driver import Job
from homeforge.serve.errors import ApiError
from homeforge.serve.gateway.pool import Pool, Upstream
from homeforge.serve.protocol import ChatRequest, CompletionRequest

RETRY_STATUS = {401, 403, 404, 408, 409, 429, 500, 502, 503, 504}  # another upstream may do better
DOWN_STATUS = {401, 403, 502, 503, 504}  # the upstream is unusable until a health check passes


@dataclass
class GatewayJob(Job):
    body: CompletionRequest | ChatRequest | None = None
    path: str = ""
    model: str | None = None  # the model id the request resolved to (gateway side)
    stream: bool = False

    def payload(self, up: Upstream, stream: bool) -> dict:
        """The request as the upstream gets it: the client's own fields, our model id, stream and token bound."""
        body = self.body.model_dump(exclude_unset=True, exclude_none=True)
        body["model"] = up.target_model or self.model
        body["stream"] = stream
        body.pop("stream_options", None)
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = self.max_tokens
        return body


class Refusal(Exception):
    """An upstream could not serve the request; ``retry``: another upstream may."""

    def __init__(self, up: Upstream, why: str, retry: bool, error: ApiError | None = None, busy: bool = False):
        super().__init__(why)
        self.up, self.why, self.retry, self.error, self.busy = up, why, retry, error, busy


def refusal(up: Upstream, status: int, body: bytes, pool: Pool) -> Refusal:
    """What an upstream's HTTP error means: the client's fault (forwarded as is) or a reason to go elsewhere."""
    message, param = body[:200].decode("utf-8", "replace"), None
    try:
        err = json.loads(body)["error"]
        message, param = (err.get("message") or message, err.get("param")) if isinstance(err, dict) else (str(err), None)
    except Exception:
        pass
    why = f"HTTP {status}: {message}"
    if status in DOWN_STATUS:
        pool.failed(up, why)
    if status in RETRY_STATUS:
        return Refusal(up, why, retry=True, busy=status == 429)
    pool.outcomes.labels(up.url, "refused").inc()
    code = "context_length_exceeded" if status == 413 or "context" in message.lower() else None
    return Refusal(up, why, retry=False, error=ApiError(status if 400 <= status < 500 else 502, message,
                                                          param=param if isinstance(param, str) else None, code=code))

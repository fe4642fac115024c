"""The wire protocol of `homeforge serve`: OpenAI request schemas (strict types) and response shapes.

Requests are validated strictly, as OpenAI does: no bool or float where an integer is
expected (``"n": 1.0``, ``"prompt": [false]``), no string where a boolean is expected
(``"echo": "yes"``), no NaN or infinity. Fields clients send that we do not use are
ignored; known OpenAI parameters this server does not implement are refused when set to
anything but their neutral value (``unsupported_parameter``), never silently ignored.

The response models here document ``GET /openapi.json``; handlers build plain dicts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

NonNegInt = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[NonNegInt], Field(min_length=1)]
StopStr = Annotated[str, Field(min_length=1)]


class _Req(BaseModel):
    # strict: no bool/float -> int, no str -> bool; extra fields (sent by OpenAI clients) are ignored
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _null_means_default(self):
        """OpenAI accepts ``null`` for most parameters, meaning "the default"."""
        for name, f in type(self).model_fields.items():
            if getattr(self, name) is None and f.default is not None:
                setattr(self, name, f.default)
        return self


class _Resp(BaseModel):
    model_config = ConfigDict(extra="allow")


# --------------------------------------------------------------------------- requests


class StreamOptions(_Req):
    include_usage: bool = True


class _Sampling(_Req):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(0, ge=-1, description="vLLM extension: sample from the k most likely tokens (0 or -1: all)")
    stop: StopStr | Annotated[list[StopStr], Field(max_length=16)] | None = None
    seed: int | None = None
    n: int | None = Field(1, ge=1, le=16)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(False, description="vLLM extension: do not stop at the end-of-sequence token")
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(None, description="not supported (only empty)")

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a known OpenAI parameter set to something this server does not do."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported by this server; leave it out or set it to 0"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by this server; leave it out"
        return None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | \
        Annotated[list[list[NonNegInt]], Field(min_length=1)]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = Field(None, description="not supported (only empty)")

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by this server; leave it out"
        if self.stream and self.echo and self.logprobs is not None:
            return "stream", "echo with logprobs is not supported when streaming"
        return super().unsupported()


class TextPart(_Req):
    type: Literal["text"]
    text: str


class FunctionCall(_Req):
    name: str
    arguments: str


class ToolCall(_Req):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _Message(_Req):
    name: str | None = None

    def text(self) -> str:
        c = getattr(self, "content", None)
        if isinstance(c, list):
            return "".join(p.text for p in c)
        return c or ""

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template expects it (text content, tool fields when present)."""
        m: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            m["name"] = self.name
        for k in ("tool_call_id", "tool_calls"):
            v = getattr(self, k, None)
            if v:
                m[k] = v if isinstance(v, str) else [t.model_dump() for t in v]
        return m


Content = str | list[TextPart]


class SystemMessage(_Message):
    role: Literal["system"]
    content: Content


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["content"]}, {"required": ["tool_calls"]}]})
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None

    @model_validator(mode="after")
    def _content_or_calls(self):
        if "content" not in self.model_fields_set and "tool_calls" not in self.model_fields_set:
            raise ValueError("an 'assistant' message needs content or tool_calls")
        return self


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


_MESSAGES = {"system": "SystemMessage", "developer": "DeveloperMessage", "user": "UserMessage",
             "assistant": "AssistantMessage", "tool": "ToolMessage"}


def _role_tag(v) -> str | None:
    role = v.get("role") if isinstance(v, dict) else getattr(v, "role", None)
    return _MESSAGES.get(role) if isinstance(role, str) else None


ChatMessage = Annotated[
    Annotated[SystemMessage, Tag("SystemMessage")] | Annotated[DeveloperMessage, Tag("DeveloperMessage")]
    | Annotated[UserMessage, Tag("UserMessage")] | Annotated[AssistantMessage, Tag("AssistantMessage")]
    | Annotated[ToolMessage, Tag("ToolMessage")],
    Discriminator(_role_tag, custom_error_type="invalid_role",
                  custom_error_message=f"role must be one of: {', '.join(_MESSAGES)}")]


class ResponseFormat(_Req):
    type: Literal["text", "json_object", "json_schema"]


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(None, description="not supported (only empty)")
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: ResponseFormat | None = Field(None, description="only type 'text' is supported")

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tool calling is not supported by this server; send the conversation without tools"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", (f"response_format {self.response_format.type!r} is not supported by this "
                                       "server; only 'text'")
        return super().unsupported()


class EmbeddingRequest(_Req):
    model: str | None = None
    input: str | Annotated[list[str], Field(min_length=1)] | TokenIds | \
        Annotated[list[list[NonNegInt]], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] | None = "float"
    user: str | None = None


class ClassificationRequest(_Req):
    model: str | None = None
    input: str | Annotated[list[str], Field(min_length=1)] | None = None
    # image classifiers: base64-encoded image file(s) (PNG, JPEG, ...; a data: URL prefix is accepted)
    image: str | Annotated[list[str], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _something_to_classify(self):
        if self.input is None and self.image is None:
            raise ValueError("send `input` (text) and/or `image` (base64)")
        return self


# --------------------------------------------------------------------------- responses (for the OpenAPI document)


class ErrorDetail(_Resp):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Resp):
    error: ErrorDetail


class Usage(_Resp):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionChoice(_Resp):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class CompletionResponse(_Resp):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None  # registry:NAME@ALIAS: the version that produced the whole response


class ChatChoice(_Resp):
    index: int
    message: dict[str, Any]
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Resp):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None  # registry:NAME@ALIAS: the version that produced the whole response


class Embedding(_Resp):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingResponse(_Resp):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class Classification(_Resp):
    index: int
    label: str
    score: float
    scores: dict[str, float]


class ClassificationResponse(_Resp):
    object: Literal["list"]
    model: str
    data: list[Classification]
    usage: Usage


class ModelCard(_Resp):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None
    version: str | None = None  # registry:NAME@ALIAS: the version being served (NAME@vN-HASH)


class ModelList(_Resp):
    object: Literal["list"]
    data: list[ModelCard]


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

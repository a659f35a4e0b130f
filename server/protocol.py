"""OpenAI request/response shapes and OpenAI-style errors: the request models, `decode_body`
(bytes -> a validated request, or an APIError 400 naming the field), response bodies and
stream chunks, and `public_reason` (the short client-facing reason for an engine failure).

Requests are parsed strictly (a string where a number belongs is a 400 naming the field,
not a silent conversion). Unknown fields are accepted, since OpenAI clients send fields
of newer API versions, but a known field whose value would change the result and that we
cannot honour (n != 1, logprobs, best_of, penalties, logit_bias, tools, ...) is a 400
naming it: nothing that changes results is ignored silently.

vLLM extensions accepted: `ignore_eos`, `top_k`, `stop_token_ids` (the openai client
sends them through `extra_body`).

Sampling parameters are checked against what the sampler really handles, as vLLM does:
  temperature  in [0, 2]; below TEMPERATURE_FLOOR (1e-5) it means greedy (a smaller
               divisor would overflow float32 logits)
  top_p        in (0, 1]; however small, the most likely token is always kept
  top_k        0 or -1 = off; >= the vocabulary size = off (every token is in the top k)
  seed         a signed 64-bit integer (vLLM's range; the sampler's hash key); else a 400
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

Number = Union[StrictInt, StrictFloat]

TEMPERATURE_FLOOR = 1e-5          # vLLM's _SAMPLING_EPS: below it sampling is greedy
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1


class APIError(Exception):
    """Becomes {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Base):
    include_usage: StrictBool = False


# Fields clients may send that would change results and that we do not implement: a value
# other than the neutral one is a 400. (field -> neutral values)
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
    "echo": (None, False), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}), "prediction": (None,), "audio": (None,),
    "modalities": (None, ["text"]), "parallel_tool_calls": (None, True, False),
    # vLLM sampling extensions we do not implement
    "min_tokens": (None, 0), "repetition_penalty": (None, 1, 1.0), "min_p": (None, 0, 0.0),
    "use_beam_search": (None, False), "length_penalty": (None, 1, 1.0),
    "include_stop_str_in_output": (None, False), "skip_special_tokens": (None, True),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "bad_words": (None, []), "allowed_token_ids": (None,), "prompt_logprobs": (None, 0),
}


class _SamplingFields(_Base):
    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # vLLM extensions
    ignore_eos: StrictBool = False
    top_k: StrictInt | None = None
    stop_token_ids: list[StrictInt] | None = None

    def check_unsupported(self) -> None:
        extra = self.model_extra or {}
        for name, neutral in _UNSUPPORTED.items():
            if name in extra and not any(extra[name] == v and type(extra[name]) is type(v) or
                                         (extra[name] is None and v is None) for v in neutral):
                allowed = ", ".join(repr(v) for v in neutral if v is not None) or "null"
                raise APIError(400, f"'{name}' = {extra[name]!r} is not supported by this server "
                                    f"(allowed: {allowed}, or leave it out)", param=name)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise APIError(400, f"temperature must be in [0, 2], got {self.temperature}", "temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k is not None and self.top_k < -1:
            raise APIError(400, f"top_k must be >= 1, or 0 or -1 for off, got {self.top_k}", "top_k")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise APIError(400, f"seed must be a signed 64-bit integer in [{SEED_MIN}, {SEED_MAX}], "
                                f"got {self.seed}", "seed")
        stops = self.stop_strings()
        if len(stops) > 4:
            raise APIError(400, f"stop takes at most 4 strings, got {len(stops)}", "stop")
        if any(s == "" for s in stops):
            raise APIError(400, "stop strings must not be empty", "stop")
        if self.stop_token_ids and any(not 0 <= t <= SEED_MAX for t in self.stop_token_ids):
            raise APIError(400, "stop_token_ids must be token ids >= 0", "stop_token_ids")

    def sampler_values(self, vocab_size: int) -> dict[str, Any]:
        """temperature, top_p, top_k, seed as the sampler takes them (see the module doc)."""
        temperature = 1.0 if self.temperature is None else float(self.temperature)
        if temperature < TEMPERATURE_FLOOR:
            temperature = 0.0
        top_k = self.top_k or 0
        if top_k < 0 or top_k >= vocab_size:
            top_k = 0
        return {"temperature": temperature, "top_p": 1.0 if self.top_p is None else float(self.top_p),
                "top_k": top_k, "seed": self.seed}

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. `prompt`: a string, a list of token ids, or a list holding one
    of those (batches of several prompts are not supported: one choice per request)."""
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        """The message's text; content parts must all be {"type": "text", "text": ...}."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"only text content parts are supported, got type {part.get('type')!r}",
                               "messages")
            out.append(part["text"])
        return "".join(out)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions. `max_completion_tokens` is the newer name of max_tokens."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None


# ------------------------------------------------------------------ decoding a body

_TYPE_LABELS = frozenset({"int", "float", "str", "bool", "none", "dict", "list"})


def _param_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p in ("body", "query"))]
    # drop the union-branch labels pydantic puts in the location ('str', 'list[int]', 'ChatMessage')
    keep = [p for p in parts if p.isdigit() or (p.isidentifier() and p not in _TYPE_LABELS and not p[0].isupper())]
    out = ""
    for p in keep:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def validation_error(errs: list[dict[str, Any]]) -> APIError:
    first = errs[0]
    param = _param_of(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        msg = f"'{param}' is a required field"
    else:
        kinds = sorted({x.get("msg", "") for x in errs if _param_of(tuple(x.get("loc", ()))) == param})
        got = first.get("input")
        msg = f"'{param}': invalid value {_short_json(got)}: " + "; or ".join(kinds)
    return APIError(400, msg, param=param)


def _short_json(v: Any) -> str:
    try:
        return json.dumps(v)[:80]
    except (TypeError, ValueError, RecursionError):
        return type(v).__name__


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode_body(raw: bytes, cls: type) -> Any:
    """The validated request (APIError 400 naming what is wrong). CPU-bound: large bodies
    run it in a worker thread."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:   # JSONDecodeError, NaN, integers too long to parse
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply") from None
    req.check_unsupported()
    return req


def public_reason(error: str | None) -> str:
    """A short reason for clients from the engine's error text (which names pids, paths and
    carries a traceback: that goes to the log only)."""
    text = (error or "").lower()
    if "shut down" in text:
        return "the engine is shut down"
    if "hung" in text or "took longer" in text or "no progress" in text:
        return "a pipeline stage stopped answering"
    if "died" in text or "killed" in text or "exit code" in text or "stopped unexpectedly" in text:
        return "a pipeline stage process died"
    return "a pipeline stage failed"



# ------------------------------------------------------------------ responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish_reason: str | None,
                    prompt_tokens: int, completion_tokens: int, created: int | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_body(rid: str, model: str, text: str, finish_reason: str | None,
              prompt_tokens: int, completion_tokens: int, created: int | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


class CompletionChunks:
    """The chunk objects of one completions stream."""
    kind = "text_completion"

    def __init__(self, rid: str, model: str, prompt_tokens: int) -> None:
        self.rid, self.model, self.prompt_tokens = rid, model, prompt_tokens
        self.created = int(time.time())
        self.tokens = 0

    def token(self, text: str, finish: str | None, is_token: bool) -> dict[str, Any]:
        self.tokens += is_token
        return completion_chunk(self.rid, self.model, self.created, text, finish)

    def usage(self) -> dict[str, Any]:
        return usage_chunk(self.rid, self.model, self.created, self.kind, self.prompt_tokens, self.tokens)


class ChatChunks(CompletionChunks):
    kind = "chat.completion.chunk"

    def __init__(self, rid: str, model: str, prompt_tokens: int) -> None:
        super().__init__(rid, model, prompt_tokens)
        self.first = True

    def token(self, text: str, finish: str | None, is_token: bool) -> dict[str, Any]:
        self.tokens += is_token
        delta: dict[str, Any] = {"role": "assistant", "content": text} if self.first else {"content": text}
        if not is_token and not text and not self.first:
            delta = {}
        self.first = False
        return chat_chunk(self.rid, self.model, self.created, delta, finish)

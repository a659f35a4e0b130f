"""What a request must pass before it reaches the engine: a JSON body within the size limit
(large ones parsed in a worker thread), this server's model name, a prompt that can fit
the context (refused before tokenizing when its characters alone cannot), token ids in the
vocabulary, and sampling parameters the engine accepts. Every refusal is an APIError
naming the field (server/protocol.py)."""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from fastapi import Request

from server.protocol import APIError, ChatCompletionRequest, CompletionRequest, decode_body
from server.tokens import InvalidText, check_text


class Generation:
    """One request's prompt and sampling parameters, checked."""

    def __init__(self, prompt_ids: list[int], params: Any, stops: list[str], include_usage: bool) -> None:
        self.prompt_ids, self.params, self.stops, self.include_usage = prompt_ids, params, stops, include_usage


class RequestIntake:
    """The checks of one server (its engine, codec, model name and limits)."""

    def __init__(self, engine: Any, codec: Any, *, model_name: str, vocab: int, max_len: int,
                 make_params: Callable[..., Any], max_request_bytes: int, thread_bytes: int) -> None:
        self.engine, self.codec, self.model_name = engine, codec, model_name
        self.vocab, self.max_len, self.make_params = vocab, max_len, make_params
        self.max_request_bytes, self.thread_bytes = max_request_bytes, thread_bytes

    async def parse(self, request: Request, cls: type) -> Any:
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise APIError(415, f"send the body as JSON with 'content-type: application/json' "
                                f"(got {ctype or 'none'!r})", code="unsupported_media_type")
        raw = await self._read_body(request)
        if len(raw) > self.thread_bytes:
            req = await asyncio.to_thread(decode_body, raw, cls)
        else:
            req = decode_body(raw, cls)
        if req.model != self.model_name:
            raise APIError(404, f"The model {req.model!r} does not exist; this server serves "
                                f"{self.model_name!r} (see /v1/models)", param="model", code="model_not_found")
        return req

    async def _read_body(self, request: Request) -> bytes:
        limit = self.max_request_bytes
        too_big = APIError(413, f"the request body is larger than {limit} bytes (--max-request-bytes)",
                           code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            parts.append(chunk)
        return b"".join(parts)

    async def encode(self, text: str, param: str) -> list[int]:
        """The prompt's token ids; a text that cannot fit is refused before tokenizing."""
        if self.codec is None:
            raise APIError(400, "this model has no tokenizer and a vocabulary under 256 tokens: "
                                "send the prompt as a list of token ids", param)
        if len(text) > self.max_len * self.codec.max_chars_per_token:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens, and the "
                                f"prompt has {len(text)} characters, more than that many tokens can hold",
                           param, code="context_length_exceeded")
        try:
            check_text(text)
            if len(text) > self.thread_bytes:
                return await asyncio.to_thread(self.codec.encode, text)
            return self.codec.encode(text)
        except InvalidText as e:
            raise APIError(400, f"{param}: {e}", param) from None

    async def chat_prompt(self, messages: list[tuple[str, str]]) -> list[int]:
        """The chat template's token ids; text that cannot fit is refused before tokenizing."""
        if self.codec is None:
            raise APIError(400, "this model has no tokenizer and a vocabulary under 256 tokens: "
                                "chat needs text; use /v1/completions with token ids", "messages")
        for i, (_, text) in enumerate(messages):
            try:
                check_text(text)
            except InvalidText as e:
                raise APIError(400, f"messages[{i}].content: {e}", f"messages[{i}].content") from None
        total = sum(len(t) for _, t in messages)
        if total > self.max_len * self.codec.max_chars_per_token:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens, and the "
                                f"messages have {total} characters, more than that many tokens can hold",
                           "messages", code="context_length_exceeded")
        if total > self.thread_bytes:
            return await asyncio.to_thread(self.codec.chat_prompt, messages)
        return self.codec.chat_prompt(messages)

    def sampling(self, req: Any, prompt_ids: list[int], default_max: int | None) -> Generation:
        prompt_field = "prompt" if isinstance(req, CompletionRequest) else "messages"
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", prompt_field)
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab]
        if bad:
            raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab})", "prompt")
        max_tokens, field = req.max_tokens, "max_tokens"
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            if max_tokens is not None and max_tokens != req.max_completion_tokens:
                raise APIError(400, "max_tokens and max_completion_tokens disagree; give one",
                               "max_completion_tokens")
            max_tokens, field = req.max_completion_tokens, "max_completion_tokens"
        n_prompt, max_len = len(prompt_ids), self.max_len
        if n_prompt >= max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens, and the prompt "
                                f"alone has {n_prompt} (it needs room for at least one generated token)",
                           prompt_field, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = default_max if default_max is not None else max_len - n_prompt
        if max_tokens < 1:
            raise APIError(400, f"{field} must be >= 1, got {max_tokens}", field)
        if n_prompt + max_tokens > max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you "
                                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, "
                                f"{max_tokens} for the completion). Reduce the prompt or {field}.",
                           field, code="context_length_exceeded")
        try:
            params = self.make_params(max_tokens=max_tokens, ignore_eos=req.ignore_eos,
                                      stop_token_ids=tuple(req.stop_token_ids or ()),
                                      **req.sampler_values(self.vocab))
        except ValueError as e:
            raise APIError(400, str(e), str(e).split(".", 1)[-1].split(" ", 1)[0] or None) from None
        try:
            self.engine.check_request(prompt_ids, params)
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None
        return Generation(prompt_ids, params, req.stop_strings(), req.include_usage)

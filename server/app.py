"""The OpenAI-compatible HTTP layer over an `AsyncLLM`-like engine (runtime/online.py).

    app = build_app(engine, model_name="dummy:llama-32m", info={"pp": 2, ...},
                    options=ServerOptions(api_key="..."))

Endpoints:
  POST /v1/completions, /v1/chat/completions   OpenAI; `stream: true` for server-sent events
  GET  /v1/models, /health, /metrics (Prometheus text)
  GET  /v1/pipetwin/info                        model, pp, policy, KV pages, max_model_len
  GET  /v1/pipetwin/stats                       engine.stats() as JSON (+ server epoch time)
  GET  /v1/pipetwin/stage_rows?since=EPOCH      stage busy rows (core.trace batches columns,
                                                start/end as epoch seconds)

Streaming sends exactly one chunk per generated token, in order (its text may be empty
while a multi-byte character or a possible stop string is pending), plus at most one last
chunk carrying only the finish_reason (when the engine's final delta holds no token), then
the usage chunk if `stream_options.include_usage`, then `data: [DONE]`. The load
generator relies on this to timestamp every token.

Every error is an OpenAI error object: 400 invalid request (field named in `param`; also
query parameters, a body that is not JSON or nests too deep, text with lone surrogates),
401 missing API key, 404 unknown model or path, 405 wrong method, 413 body over
`max_request_bytes`, 415 a POST that is not `content-type: application/json` (which also
means a web page cannot POST here without a CORS preflight, which this server refuses),
503 when the engine is down (also /health). Clients get a short reason; tracebacks, paths
and pids go to the server log only. Load never fails a request: it waits in the
scheduler's queue. A client that disconnects has its request aborted (its KV pages freed):
streams through Starlette's disconnect listener, non-streaming requests by polling.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from core.trace import BATCH_COLUMNS
from server.access import Gate
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.protocol import (APIError, ChatChunks, ChatCompletionRequest, CompletionChunks, CompletionRequest,
                             chat_body, completion_body, decode_body, error_body, new_id, public_reason,
                             validation_error)
from server.supervisor import MODES, Supervisor
from server.tokens import InvalidText, StopChecker, check_text, make_codec

log = logging.getLogger("pipetwin.server")

DISCONNECT_POLL_S = 0.5


@dataclass(frozen=True)
class ServerOptions:
    """What a deployment chooses (`pipetwin serve` flags of the same names)."""
    api_key: str | None = None                 # Bearer token for /v1/* and the docs; None: open
    max_request_bytes: int = 4 * 2**20         # larger bodies: 413
    thread_bytes: int = 64 * 2**10             # bodies (and prompts) above this parse in a worker thread
    disable_docs: bool = False                 # no /docs, /redoc, /openapi.json
    disable_pipetwin_api: bool = False         # no /v1/pipetwin/*
    allowed_hosts: tuple[str, ...] | None = None   # Host header names accepted; None: any
    on_engine_failure: str = "exit"            # restart | exit (server/supervisor.py)

    def __post_init__(self) -> None:
        if self.on_engine_failure not in MODES:
            raise ValueError(f"on_engine_failure must be one of {', '.join(MODES)}, got {self.on_engine_failure!r}")
        if not (isinstance(self.max_request_bytes, int) and self.max_request_bytes >= 1024):
            raise ValueError(f"max_request_bytes must be an int >= 1024, got {self.max_request_bytes!r}")
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key.strip()
                                             and self.api_key.isprintable() and " " not in self.api_key):
            raise ValueError("api_key must be a non-empty printable string without spaces")


class JSON(JSONResponse):
    """JSON with non-ASCII escaped: a client's text echoed in an error (a model name with a
    lone surrogate, say) always encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


class _Stream(StreamingResponse):
    """A StreamingResponse that always closes its generator (so the engine request is
    aborted) when the response ends, however it ends."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Generation:
    """One request's prompt and sampling parameters, checked."""

    def __init__(self, prompt_ids: list[int], params: Any, stops: list[str], include_usage: bool) -> None:
        self.prompt_ids, self.params, self.stops, self.include_usage = prompt_ids, params, stops, include_usage


class OpenAIServer:
    """The app's shared state (engine, codec, metrics, options) with the endpoints as methods."""

    def __init__(self, engine: Any, *, model_name: str, info: dict[str, Any] | None = None,
                 sampling_params: Callable[..., Any] | None = None,
                 on_shutdown: Callable[[], None] | None = None, options: ServerOptions | None = None,
                 on_fatal: Callable[[int], None] | None = None) -> None:
        if sampling_params is None:
            # why: runtime.llm loads torch; a server over a stand-in engine needs none
            from runtime.llm import SamplingParams as sampling_params  # noqa: N813
        self.engine, self.model_name, self.info = engine, model_name, dict(info or {})
        self.make_params, self.on_shutdown = sampling_params, on_shutdown
        self.options = options or ServerOptions()
        self.metrics = ServerMetrics(engine)
        self.codec = make_codec(getattr(engine, "tokenizer", None), engine.model_config.vocab_size)
        self.vocab = int(engine.model_config.vocab_size)
        self.max_len = int(engine.max_model_len)
        self.eos = frozenset(getattr(engine, "eos_token_ids", frozenset()))
        self.created = int(time.time())
        self.supervisor = Supervisor(engine, self.options.on_engine_failure, on_fatal=on_fatal).start()
        self.app = self._build()

    # ---------------------------------------------------------------- wiring

    def _build(self) -> FastAPI:
        o = self.options
        docs = {} if not o.disable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
        app = FastAPI(title="pipetwin OpenAI-compatible server", lifespan=self._lifespan, **docs)
        app.state.server, app.state.engine, app.state.metrics, app.state.codec = (
            self, self.engine, self.metrics, self.codec)
        app.add_exception_handler(APIError, self._api_error)
        app.add_exception_handler(HTTPException, self._http_error)
        app.add_exception_handler(RequestValidationError, self._query_error)
        app.add_exception_handler(Exception, self._internal)
        app.add_middleware(Gate, api_key=o.api_key, allowed_hosts=o.allowed_hosts,
                           on_status=lambda ep, st: self.metrics.http.labels(ep, str(st)).inc())
        route = app.add_api_route
        route("/v1/completions", self.completions, methods=["POST"])
        route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        route("/v1/models", self.models, methods=["GET"])
        route("/health", self.health, methods=["GET"])
        route("/metrics", self.prometheus, methods=["GET"])
        if not o.disable_pipetwin_api:
            route("/v1/pipetwin/info", self.pipetwin_info, methods=["GET"])
            route("/v1/pipetwin/stats", self.pipetwin_stats, methods=["GET"])
            route("/v1/pipetwin/stage_rows", self.pipetwin_stage_rows, methods=["GET"])
        route("/", self.root, methods=["GET"], include_in_schema=False)
        return app

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            self.supervisor.stop()
            if self.on_shutdown is not None:
                log.info("shutting the engine down")
                await asyncio.to_thread(self.on_shutdown)

    # ---------------------------------------------------------------- errors

    async def _api_error(self, request: Request, e: APIError) -> Response:
        return JSON(e.body(), status_code=e.status)

    async def _http_error(self, request: Request, e: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{e.detail}: {request.method} {request.url.path}"
        return JSON(error_body(msg, "invalid_request_error", None, code), status_code=e.status_code,
                    headers=getattr(e, "headers", None))

    async def _query_error(self, request: Request, e: RequestValidationError) -> Response:
        return JSON(validation_error(list(e.errors())).body(), status_code=400)

    async def _internal(self, request: Request, e: Exception) -> Response:
        ref = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s", ref, request.url.path, exc_info=e)
        return JSON(error_body(f"internal server error (reference {ref} in the server log)", "server_error"),
                    status_code=500)

    def check_alive(self) -> None:
        """APIError 503 with a short reason while the engine is down (the supervisor logs the
        full cause)."""
        engine = self.engine
        if engine.healthy:
            return
        reason = public_reason(engine.error)
        if self.supervisor.restarting:
            raise APIError(503, f"the engine is restarting after a failure ({reason}); retry shortly",
                           type="server_error", code="engine_restarting")
        raise APIError(503, f"the engine is down: {reason}", type="server_error", code="engine_dead")

    # ---------------------------------------------------------------- requests in

    async def parse(self, request: Request, cls: type) -> Any:
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise APIError(415, f"send the body as JSON with 'content-type: application/json' "
                                f"(got {ctype or 'none'!r})", code="unsupported_media_type")
        raw = await self._read_body(request)
        if len(raw) > self.options.thread_bytes:
            req = await asyncio.to_thread(decode_body, raw, cls)
        else:
            req = decode_body(raw, cls)
        if req.model != self.model_name:
            raise APIError(404, f"The model {req.model!r} does not exist; this server serves "
                                f"{self.model_name!r} (see /v1/models)", param="model", code="model_not_found")
        return req

    async def _read_body(self, request: Request) -> bytes:
        limit = self.options.max_request_bytes
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
            if len(text) > self.options.thread_bytes:
                return await asyncio.to_thread(self.codec.encode, text)
            return self.codec.encode(text)
        except InvalidText as e:
            raise APIError(400, f"{param}: {e}", param) from None

    def sampling(self, req: Any, prompt_ids: list[int], default_max: int | None) -> _Generation:
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
        return _Generation(prompt_ids, params, req.stop_strings(), req.include_usage)

    # ---------------------------------------------------------------- running one request

    async def run(self, g: _Generation) -> AsyncIterator[tuple[str, str | None, bool]]:
        """Drive the engine; yields (text, finish_reason, is_token) per token (and once more with
        is_token False when the final delta holds no token). Closes the engine stream when done."""
        stop = StopChecker(self.codec.decoder() if self.codec else None, g.stops)
        arrival = time.perf_counter()
        first = last = None
        n = 0
        finish = None
        gen = self.engine.generate(g.prompt_ids, g.params)
        try:
            async for delta in gen:
                if delta.finish_reason == "error":   # this request alone failed in the engine
                    raise APIError(500, "the engine could not generate a token for this request (non-finite "
                                        "logits); other requests are not affected", type="server_error",
                                   code="request_failed")
                toks = delta.token_ids
                for i, t in enumerate(toks):
                    n += 1
                    last = time.perf_counter()
                    if first is None:
                        first = last
                    text = stop.add((t,))
                    if stop.stopped:
                        finish = "stop"
                        yield text, finish, True
                        break
                    is_last = delta.finished and i == len(toks) - 1
                    if is_last:
                        finish = delta.finish_reason
                        text += stop.finish()
                    yield text, finish if is_last else None, True
                if finish is not None:
                    break
                if delta.finished:
                    finish = delta.finish_reason
                    yield stop.finish(), finish, False
                    break
        except (asyncio.CancelledError, GeneratorExit):
            finish = "abort"
            raise
        except APIError:
            finish = "error"
            raise
        except Exception as e:  # noqa: BLE001 - engine death or a bug: report, never hang
            finish = "error"
            self.check_alive()
            ref = uuid.uuid4().hex[:12]
            log.error("generation failed (reference %s)", ref, exc_info=e)
            raise APIError(500, f"generation failed (reference {ref} in the server log)",
                           type="server_error") from e
        finally:
            await gen.aclose()
            self.metrics.observe(arrival, first, last, n, finish or "abort")

    async def non_streaming(self, request: Request, g: _Generation) -> tuple[str, str | None, int]:
        async def collect() -> tuple[str, str | None, int]:
            parts: list[str] = []
            finish = None
            n = 0
            async with contextlib.aclosing(self.run(g)) as tokens:
                async for text, fr, is_token in tokens:
                    parts.append(text)
                    n += is_token
                    finish = fr or finish
            return "".join(parts), finish, n

        task = asyncio.ensure_future(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    log.info("client disconnected; aborting its request")
                    task.cancel()
                    raise APIError(499, "client disconnected")
        finally:
            if not task.done():
                task.cancel()

    async def _events(self, g: _Generation, chunks: CompletionChunks) -> AsyncIterator[str]:
        """The SSE lines of one stream; an error after the first byte is an error event."""
        try:
            async with contextlib.aclosing(self.run(g)) as tokens:
                async for text, finish, is_token in tokens:
                    yield _sse(chunks.token(text, finish, is_token))
            if g.include_usage:
                yield _sse(chunks.usage())
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    # ---------------------------------------------------------------- endpoints

    async def completions(self, request: Request) -> Response:
        self.check_alive()
        req: CompletionRequest = await self.parse(request, CompletionRequest)
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"prompt: batches of {len(p)} prompts are not supported; "
                                    "send one prompt per request", "prompt")
            p = p[0]
        ids = await self.encode(p, "prompt") if isinstance(p, str) else list(p)
        g = self.sampling(req, ids, default_max=16)
        rid = new_id("cmpl")
        if req.stream:
            return self._stream(g, CompletionChunks(rid, self.model_name, len(g.prompt_ids)))
        text, finish, n = await self.non_streaming(request, g)
        return JSON(completion_body(rid, self.model_name, text, finish, len(ids), n))

    async def chat_completions(self, request: Request) -> Response:
        self.check_alive()
        req: ChatCompletionRequest = await self.parse(request, ChatCompletionRequest)
        msgs = [(m.role, m.text()) for m in req.messages]
        if self.codec is None:
            raise APIError(400, "this model has no tokenizer and a vocabulary under 256 tokens: "
                                "chat needs text; use /v1/completions with token ids", "messages")
        for i, (_, text) in enumerate(msgs):
            try:
                check_text(text)
            except InvalidText as e:
                raise APIError(400, f"messages[{i}].content: {e}", f"messages[{i}].content") from None
        total = sum(len(t) for _, t in msgs)
        if total > self.max_len * self.codec.max_chars_per_token:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens, and the "
                                f"messages have {total} characters, more than that many tokens can hold",
                           "messages", code="context_length_exceeded")
        if total > self.options.thread_bytes:
            ids = await asyncio.to_thread(self.codec.chat_prompt, msgs)
        else:
            ids = self.codec.chat_prompt(msgs)
        g = self.sampling(req, ids, default_max=None)
        rid = new_id("chatcmpl")
        if req.stream:
            return self._stream(g, ChatChunks(rid, self.model_name, len(g.prompt_ids)))
        text, finish, n = await self.non_streaming(request, g)
        return JSON(chat_body(rid, self.model_name, text, finish, len(ids), n))

    def _stream(self, g: _Generation, chunks: CompletionChunks) -> Response:
        return _Stream(self._events(g, chunks), media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache"})

    async def models(self) -> Response:
        return JSON({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "pipetwin",
             "max_model_len": self.max_len}]})

    async def health(self) -> Response:
        try:
            self.check_alive()
        except APIError as e:
            return JSON({"status": "error", **e.body()}, status_code=503)
        return JSON({"status": "ok"})

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def pipetwin_info(self) -> Response:
        return JSON({"model": self.model_name, "max_model_len": self.max_len, "num_pages": self.engine.num_pages,
                     "page_size": self.engine.page_size, "vocab_size": self.vocab,
                     "tokenizer": self.codec.name if self.codec else None, "eos_token_ids": sorted(self.eos),
                     **self.info})

    async def pipetwin_stats(self) -> Response:
        self.check_alive()
        s = self.engine.stats()
        return JSON({"time": time.time(), "running": s.running, "waiting": s.waiting,
                     "kv_used_pages": s.kv_used_pages, "kv_total_pages": s.kv_total_pages,
                     "kv_utilization": s.kv_utilization, "bubble_ratio": s.bubble_ratio,
                     "prompt_tokens_total": s.prompt_tokens_total,
                     "generation_tokens_total": s.generation_tokens_total,
                     "requests_finished_total": s.requests_finished_total})

    async def pipetwin_stage_rows(self, since: float = 0.0) -> Response:
        rows = self.engine.stage_rows(since)
        return JSON({"columns": BATCH_COLUMNS, "rows": [list(r) for r in rows]})

    async def root(self) -> PlainTextResponse:
        return PlainTextResponse(f"pipetwin server: {self.model_name}; OpenAI API under /v1\n")


def build_app(engine: Any, *, model_name: str, info: dict[str, Any] | None = None,
              sampling_params: Callable[..., Any] | None = None,
              on_shutdown: Callable[[], None] | None = None, options: ServerOptions | None = None,
              on_fatal: Callable[[int], None] | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the model name `model_name` (`app.state.server`
    is its OpenAIServer).

    sampling_params: the SamplingParams class (default runtime.llm.SamplingParams).
    on_shutdown: called (in a thread) when the server shuts down, e.g. engine.shutdown: uvicorn
    re-raises SIGINT/SIGTERM after its graceful shutdown, so code after uvicorn.run may not run.
    on_fatal: called with an exit status when the engine is down for good (server/supervisor.py)."""
    return OpenAIServer(engine, model_name=model_name, info=info, sampling_params=sampling_params,
                        on_shutdown=on_shutdown, options=options, on_fatal=on_fatal).app

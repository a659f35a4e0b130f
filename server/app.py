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
                             chat_body, completion_body, error_body, new_id, public_reason, validation_error)
from server.supervisor import MODES, Supervisor
from server.intake import Generation, RequestIntake
from server.tokens import StopChecker, make_codec

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


class OpenAIServer:
    """The app's shared state (engine, codec, metrics, options) with the endpoints as methods;
    a request's body, prompt and sampling parameters are checked by its RequestIntake."""

    def __init__(self, engine: Any, *, model_name: str, info: dict[str, Any] | None = None,
                 sampling_params: Callable[..., Any] | None = None,
                 on_shutdown: Callable[[], None] | None = None, options: ServerOptions | None = None,
                 on_fatal: Callable[[int], None] | None = None) -> None:
        if sampling_params is None:
            # why: runtime.llm loads torch; a server over a stand-in engine needs none
            from runtime.llm import SamplingParams as sampling_params  # noqa: N813
        self.engine, self.model_name, self.info = engine, model_name, dict(info or {})
        self.on_shutdown = on_shutdown
        self.options = options or ServerOptions()
        self.metrics = ServerMetrics(engine)
        self.codec = make_codec(getattr(engine, "tokenizer", None), engine.model_config.vocab_size)
        self.vocab = int(engine.model_config.vocab_size)
        self.max_len = int(engine.max_model_len)
        self.eos = frozenset(getattr(engine, "eos_token_ids", frozenset()))
        self.created = int(time.time())
        self.intake = RequestIntake(engine, self.codec, model_name=model_name, vocab=self.vocab,
                                    max_len=self.max_len, make_params=sampling_params,
                                    max_request_bytes=self.options.max_request_bytes,
                                    thread_bytes=self.options.thread_bytes)
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

    # ---------------------------------------------------------------- running one request

    async def run(self, g: Generation) -> AsyncIterator[tuple[str, str | None, bool]]:
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

    async def non_streaming(self, request: Request, g: Generation) -> tuple[str, str | None, int]:
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

    async def _events(self, g: Generation, chunks: CompletionChunks) -> AsyncIterator[str]:
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
        req: CompletionRequest = await self.intake.parse(request, CompletionRequest)
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"prompt: batches of {len(p)} prompts are not supported; "
                                    "send one prompt per request", "prompt")
            p = p[0]
        ids = await self.intake.encode(p, "prompt") if isinstance(p, str) else list(p)
        g = self.intake.sampling(req, ids, default_max=16)
        rid = new_id("cmpl")
        if req.stream:
            return self._stream(g, CompletionChunks(rid, self.model_name, len(g.prompt_ids)))
        text, finish, n = await self.non_streaming(request, g)
        return JSON(completion_body(rid, self.model_name, text, finish, len(ids), n))

    async def chat_completions(self, request: Request) -> Response:
        self.check_alive()
        req: ChatCompletionRequest = await self.intake.parse(request, ChatCompletionRequest)
        ids = await self.intake.chat_prompt([(m.role, m.text()) for m in req.messages])
        g = self.intake.sampling(req, ids, default_max=None)
        rid = new_id("chatcmpl")
        if req.stream:
            return self._stream(g, ChatChunks(rid, self.model_name, len(g.prompt_ids)))
        text, finish, n = await self.non_streaming(request, g)
        return JSON(chat_body(rid, self.model_name, text, finish, len(ids), n))

    def _stream(self, g: Generation, chunks: CompletionChunks) -> Response:
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

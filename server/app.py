"""The OpenAI-compatible HTTP layer over an `AsyncLLM`-like engine (runtime/online.py).

    app = build_app(engine, model_name="dummy:llama-32m", info={"pp": 2, ...})

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

Errors are OpenAI error objects: 400 invalid request (field named in `param`), 404 unknown
model, 503 when the engine is dead (also /health). Load never fails a request: it waits in
the scheduler's queue. A client that disconnects has its request aborted (its KV pages
freed): streams through Starlette's disconnect listener, non-streaming requests by polling.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from server.metrics import CONTENT_TYPE, ServerMetrics
from server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, chat_body, chat_chunk,
                             completion_body, completion_chunk, error_body, new_id, usage_chunk)
from server.tokens import StopChecker, make_codec

log = logging.getLogger("pipetwin.server")

DISCONNECT_POLL_S = 0.5


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


_TYPE_LABELS = frozenset({"int", "float", "str", "bool", "none", "dict", "list"})


def _param_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p in ("body",))]
    # drop the union-branch labels pydantic puts in the location ('str', 'list[int]', 'ChatMessage')
    keep = [p for p in parts if p.isdigit() or (p.isidentifier() and p not in _TYPE_LABELS and not p[0].isupper())]
    out = ""
    for p in keep:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _validation_error(e: ValidationError) -> APIError:
    errs = e.errors()
    first = errs[0]
    param = _param_of(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        msg = f"'{param}' is a required field"
    else:
        kinds = sorted({x.get("msg", "") for x in errs if _param_of(tuple(x.get("loc", ()))) == param})
        got = first.get("input")
        msg = f"'{param}': invalid value {json.dumps(got)[:80] if _jsonable(got) else type(got).__name__}: " \
              + "; or ".join(kinds)
    return APIError(400, msg, param=param)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


class _Generation:
    """One request's prompt and sampling parameters, checked."""

    def __init__(self, prompt_ids: list[int], params: Any, stops: list[str], include_usage: bool) -> None:
        self.prompt_ids, self.params, self.stops, self.include_usage = prompt_ids, params, stops, include_usage


def build_app(engine: Any, *, model_name: str, info: dict[str, Any] | None = None,
              sampling_params: Callable[..., Any] | None = None,
              on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the model name `model_name`.

    sampling_params: the SamplingParams class (default runtime.llm.SamplingParams).
    on_shutdown: called (in a thread) when the server shuts down, e.g. engine.shutdown: uvicorn
    re-raises SIGINT/SIGTERM after its graceful shutdown, so code after uvicorn.run may not run."""
    if sampling_params is None:
        from runtime.llm import SamplingParams as sampling_params  # noqa: N813
    SP = sampling_params

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if on_shutdown is not None:
                log.info("shutting the engine down")
                await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="pipetwin OpenAI-compatible server", lifespan=lifespan)
    metrics = ServerMetrics(engine)
    codec = make_codec(getattr(engine, "tokenizer", None), engine.model_config.vocab_size)
    max_len = int(engine.max_model_len)
    eos = frozenset(getattr(engine, "eos_token_ids", frozenset()))
    created = int(time.time())
    dead_logged = {"done": False}
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.codec = codec

    def check_alive() -> None:
        if not engine.healthy:
            cause = engine.error or "unknown cause"
            if not dead_logged["done"]:
                dead_logged["done"] = True
                log.error("engine is dead: %s", cause)
            raise APIError(503, f"the engine is dead ({cause}); restart the server", type="server_error",
                           code="engine_dead")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(f"internal server error: {type(e).__name__}: {e}", "server_error"),
                            status_code=500)

    async def parse(request: Request, cls: type) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            raise _validation_error(e) from None
        req.check_unsupported()
        if req.model != model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{model_name}' "
                                "(see /v1/models)", param="model", code="model_not_found")
        return req

    def sampling(req: Any, prompt_ids: list[int], default_max: int | None) -> _Generation:
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", "prompt" if isinstance(req, CompletionRequest) else "messages")
        vocab = engine.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        max_tokens = req.max_tokens
        field = "max_tokens"
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            if max_tokens is not None and max_tokens != req.max_completion_tokens:
                raise APIError(400, "max_tokens and max_completion_tokens disagree; give one",
                               "max_completion_tokens")
            max_tokens, field = req.max_completion_tokens, "max_completion_tokens"
        n_prompt = len(prompt_ids)
        if n_prompt >= max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens, and the prompt "
                                f"alone has {n_prompt} (it needs room for at least one generated token)",
                           "prompt" if isinstance(req, CompletionRequest) else "messages",
                           code="context_length_exceeded")
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
            params = SP(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed,
                        ignore_eos=req.ignore_eos, stop_token_ids=tuple(req.stop_token_ids or ()))
        except ValueError as e:
            raise APIError(400, str(e), str(e).split(".", 1)[-1].split(" ", 1)[0] or None) from None
        try:
            engine.check_request(prompt_ids, params)
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None
        return _Generation(prompt_ids, params, req.stop_strings(), req.include_usage)

    # ---------------------------------------------------------------- running one request

    async def run(request: Request, g: _Generation) -> AsyncIterator[tuple[str, str | None, bool]]:
        """Drive the engine; yields (text, finish_reason, is_token) per token (and once more with
        is_token False when the final delta holds no token). Closes the engine stream when done."""
        stop = StopChecker(codec.decoder() if codec else None, g.stops)
        arrival = time.perf_counter()
        first = last = None
        n = 0
        finish = None
        gen = engine.generate(g.prompt_ids, g.params)
        try:
            async for delta in gen:
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
        except Exception as e:  # noqa: BLE001 - engine death or a bug: report, never hang
            finish = "error"
            if not engine.healthy:
                check_alive()
            log.exception("generation failed")
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error") from e
        finally:
            await gen.aclose()
            metrics.observe(arrival, first, last, n, finish or "abort")

    async def non_streaming(request: Request, g: _Generation) -> tuple[str, str | None, int]:
        async def collect() -> tuple[str, str | None, int]:
            parts: list[str] = []
            finish = None
            n = 0
            async with contextlib.aclosing(run(request, g)) as tokens:
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

    # ---------------------------------------------------------------- endpoints

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        status = 200
        try:
            check_alive()
            req: CompletionRequest = await parse(request, CompletionRequest)
            p = req.prompt
            if isinstance(p, list) and p and isinstance(p[0], (str, list)):
                if len(p) != 1:
                    raise APIError(400, f"prompt: batches of {len(p)} prompts are not supported; "
                                        "send one prompt per request", "prompt")
                p = p[0]
            if isinstance(p, str):
                if codec is None:
                    raise APIError(400, "this model has no tokenizer and a vocabulary under 256 tokens: "
                                        "send the prompt as a list of token ids", "prompt")
                ids = codec.encode(p)
            else:
                ids = list(p)
            g = sampling(req, ids, default_max=16)
            rid = new_id("cmpl")
            if req.stream:
                return _Stream(_stream_completion(request, g, rid, req), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
            text, finish, n = await non_streaming(request, g)
            return JSONResponse(completion_body(rid, model_name, text, finish, len(ids), n))
        except APIError as e:
            status = e.status
            raise
        finally:
            metrics.http.labels("completions", str(status)).inc()

    async def _stream_completion(request: Request, g: _Generation, rid: str, req: Any) -> AsyncIterator[str]:
        t = int(time.time())
        n = 0
        try:
            async with contextlib.aclosing(run(request, g)) as tokens:
                async for text, finish, is_token in tokens:
                    n += is_token
                    yield _sse(completion_chunk(rid, model_name, t, text, finish))
            if g.include_usage:
                yield _sse(usage_chunk(rid, model_name, t, "text_completion", len(g.prompt_ids), n))
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        status = 200
        try:
            check_alive()
            req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
            msgs = [(m.role, m.text()) for m in req.messages]
            if codec is None:
                raise APIError(400, "this model has no tokenizer and a vocabulary under 256 tokens: "
                                    "chat needs text; use /v1/completions with token ids", "messages")
            ids = codec.chat_prompt(msgs)
            g = sampling(req, ids, default_max=None)
            rid = new_id("chatcmpl")
            if req.stream:
                return _Stream(_stream_chat(request, g, rid), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
            text, finish, n = await non_streaming(request, g)
            return JSONResponse(chat_body(rid, model_name, text, finish, len(ids), n))
        except APIError as e:
            status = e.status
            raise
        finally:
            metrics.http.labels("chat_completions", str(status)).inc()

    async def _stream_chat(request: Request, g: _Generation, rid: str) -> AsyncIterator[str]:
        t = int(time.time())
        n = 0
        first = True
        try:
            async with contextlib.aclosing(run(request, g)) as tokens:
                async for text, finish, is_token in tokens:
                    n += is_token
                    delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
                    if not is_token and not text and not first:
                        delta = {}
                    first = False
                    yield _sse(chat_chunk(rid, model_name, t, delta, finish))
            if g.include_usage:
                yield _sse(usage_chunk(rid, model_name, t, "chat.completion.chunk", len(g.prompt_ids), n))
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "pipetwin",
             "max_model_len": max_len}]})

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        try:
            check_alive()
        except APIError as e:
            return JSONResponse({"status": "error", **e.body()}, status_code=503)
        return JSONResponse({"status": "ok"})  # pragma: no cover - raced back to healthy

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/pipetwin/info")
    async def pipetwin_info() -> JSONResponse:
        return JSONResponse({"model": model_name, "max_model_len": max_len, "num_pages": engine.num_pages,
                             "page_size": engine.page_size, "vocab_size": engine.model_config.vocab_size,
                             "tokenizer": codec.name if codec else None, "eos_token_ids": sorted(eos),
                             **(info or {})})

    @app.get("/v1/pipetwin/stats")
    async def pipetwin_stats() -> JSONResponse:
        check_alive()
        s = engine.stats()
        return JSONResponse({"time": time.time(), "running": s.running, "waiting": s.waiting,
                             "kv_used_pages": s.kv_used_pages, "kv_total_pages": s.kv_total_pages,
                             "kv_utilization": s.kv_utilization, "bubble_ratio": s.bubble_ratio,
                             "prompt_tokens_total": s.prompt_tokens_total,
                             "generation_tokens_total": s.generation_tokens_total,
                             "requests_finished_total": s.requests_finished_total})

    @app.get("/v1/pipetwin/stage_rows")
    async def pipetwin_stage_rows(since: float = 0.0) -> JSONResponse:
        from core.trace import BATCH_COLUMNS
        rows = engine.stage_rows(since)
        return JSONResponse({"columns": BATCH_COLUMNS, "rows": [list(r) for r in rows]})

    @app.get("/", include_in_schema=False)
    async def root() -> PlainTextResponse:
        return PlainTextResponse(f"pipetwin server: {model_name}; OpenAI API under /v1\n")

    return app

"""Who may call what, and what every HTTP exchange ended with.

`Gate` is plain ASGI middleware around the FastAPI app (so it sees every request,
including unknown paths and unhandled exceptions):

- Host header (optional, `allowed_hosts`): a request naming another host is a 400. With a
  loopback bind, `pipetwin serve` allows loopback names only, which stops DNS rebinding
  (a web page whose name resolves to 127.0.0.1 would otherwise talk to the server as its
  own origin).
- API key (optional, `api_key`): `Authorization: Bearer <key>` on /v1/* (the pipetwin
  API included) and on the docs (/docs, /redoc, /openapi.json), as vLLM does; /health,
  /metrics and / stay open for probes and scrapers. A wrong or missing key is a 401.
- Outcome counting: every response's real status goes to `on_status(endpoint, status)`,
  an exception that escapes the app counted as the 500 the client gets.
"""
from __future__ import annotations

import hmac
import json
from typing import Any, Callable, Iterable

from server.protocol import error_body

DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat_completions",
              "/v1/models": "models", "/health": "health", "/metrics": "metrics", "/": "root"}


def endpoint_label(path: str) -> str:
    """A bounded label for a path (unknown paths share one, so clients cannot grow /metrics)."""
    if path in _ENDPOINTS:
        return _ENDPOINTS[path]
    if path.startswith("/v1/pipetwin/"):
        return "pipetwin"
    if path in DOC_PATHS:
        return "docs"
    return "other"


def needs_key(path: str) -> bool:
    return path.startswith("/v1/") or path in DOC_PATHS


def host_name(header: str) -> str:
    """The host part of a Host header: 'a.b:80' -> 'a.b', '[::1]:8000' -> '::1'."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class Gate:
    def __init__(self, app: Any, *, api_key: str | None, allowed_hosts: Iterable[str] | None,
                 on_status: Callable[[str, int], None]) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)
        self.on_status = on_status

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        label = endpoint_label(path)
        headers = dict(scope.get("headers") or ())
        if self.hosts is not None and "*" not in self.hosts:
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.hosts:
                await self._deny(send, label, 400, "invalid Host header: this server answers to "
                                 + ", ".join(sorted(self.hosts)), "invalid_host")
                return
        if self.key is not None and needs_key(path):
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                await self._deny(send, label, 401, "missing or incorrect API key: send "
                                 "'Authorization: Bearer <key>'", "invalid_api_key",
                                 [(b"www-authenticate", b"Bearer")])
                return
        status = 500

        async def observe(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            self.on_status(label, status)

    async def _deny(self, send: Any, label: str, status: int, message: str, code: str,
                    extra: list[tuple[bytes, bytes]] = ()) -> None:
        body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})
        self.on_status(label, status)

"""`pipetwin serve`: an AsyncLLM behind the OpenAI-compatible app, run by uvicorn; and
`ServerThread`, the same server on a loopback port in a background thread (tests, tools).
"""
from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
from typing import Any

from core.policies import make_policy
from runtime.engine_args import add_engine_args, check_engine_values, engine_kwargs

log = logging.getLogger("pipetwin.server")


class ServerThread:
    """uvicorn serving `app` in a daemon thread on host:port (port 0 = a free one).

        with ServerThread(app) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="pipetwin-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser, param_type: Any) -> None:
    add_engine_args(p)
    p.add_argument("--served-model-name", help="the name clients put in `model` (default: --model as given)")
    p.add_argument("--policy", default="token_throttling", help="token_throttling | sarathi | vllm | time_balanced | dotted.path.Class")
    p.add_argument("--param", type=param_type, action="append", default=[], metavar="KEY=VALUE",
                   help="policy parameter (repeatable); values parsed as YAML")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--bubble-window", type=float, default=10.0,
                   help="seconds of stage rows behind the /metrics bubble ratio (default 10)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_server_arguments(p)


API_KEY_ENV = "PIPETWIN_API_KEY"


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """Who may call the server, how much one request may send, what happens when the engine fails."""
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1/* and the docs "
                                      f"(default: ${API_KEY_ENV} if set, else no key)")
    p.add_argument("--max-request-bytes", type=int, default=4 * 2**20,
                   help="largest request body accepted, bytes (default 4 MiB; larger: 413)")
    p.add_argument("--disable-docs", action="store_true", help="no /docs, /redoc, /openapi.json")
    p.add_argument("--disable-pipetwin-api", action="store_true", help="no /v1/pipetwin/* (stage rows, stats, info)")
    p.add_argument("--allowed-hosts", help="comma list of Host header names to answer, or '*' for any "
                                           "(default: loopback names when --host is loopback, else any)")
    p.add_argument("--on-engine-failure", default="exit", choices=("exit", "restart"),
                   help="when a stage dies or hangs: exit non-zero (default; a process supervisor restarts "
                        "the server) or rebuild the pipeline in place (3 tries; more than 5 restarts in "
                        "5 minutes exits)")
    p.add_argument("--stage-timeout", type=float, default=10.0,
                   help="seconds without a finished micro-batch, while requests are outstanding, before the "
                        "pipeline is declared hung (default 10; 10x the longest recent gap if longer)")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_options(args: argparse.Namespace) -> Any:
    """server.app.ServerOptions from the flags (ValueError naming the flag)."""
    import os

    from server.access import LOOPBACK_HOSTS  # why: server.app loads fastapi; `--help` stays light
    from server.app import ServerOptions  # why: fastapi, as above

    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if args.allowed_hosts is not None:
        hosts = tuple(h.strip().lower() for h in args.allowed_hosts.split(",") if h.strip())
        if not hosts:
            raise ValueError("--allowed-hosts: give host names separated by commas, or '*'")
    else:
        hosts = LOOPBACK_HOSTS if is_loopback(args.host) else None
    try:
        return ServerOptions(api_key=key, max_request_bytes=args.max_request_bytes, disable_docs=args.disable_docs,
                             disable_pipetwin_api=args.disable_pipetwin_api, allowed_hosts=hosts,
                             on_engine_failure=args.on_engine_failure)
    except ValueError as e:
        flag = "--api-key" if "api_key" in str(e) else "--max-request-bytes"
        raise ValueError(f"{flag}: {e}") from None


def exposure_warning(host: str, options: Any) -> str | None:
    """What to warn about at start-up when the server is reachable beyond this machine."""
    if options.api_key is None and not is_loopback(host):
        return (f"listening on {host} without an API key: anyone who can reach this address can use the "
                f"model and read /v1/pipetwin/*; give --api-key or ${API_KEY_ENV}")
    return None


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag."""
    check_engine_values(vars(args))
    if args.port < 0:
        raise ValueError(f"--port must be an integer >= 0, got {args.port}")
    if args.port > 65535:
        raise ValueError(f"--port must be <= 65535, got {args.port}")
    if not args.bubble_window > 0:
        raise ValueError(f"--bubble-window must be > 0 seconds, got {args.bubble_window}")
    try:
        make_policy(args.policy, dict(args.param))
    except (ValueError, TypeError) as e:
        raise ValueError(f"--policy/--param: {e}") from None
    if not args.stage_timeout > 0:
        raise ValueError(f"--stage-timeout must be > 0 seconds, got {args.stage_timeout}")
    server_options(args)


def make_engine(args: argparse.Namespace) -> Any:
    from runtime import AsyncLLM  # why: torch, loaded when the server starts, not for --help

    kw = engine_kwargs(args)
    return AsyncLLM(kw.pop("model"), policy=args.policy, policy_params=dict(args.param),
                    bubble_window_s=args.bubble_window, stage_timeout_s=args.stage_timeout, **kw)


def run_cli(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import build_app  # why: fastapi, only when a server starts

    check_args(args)
    options = server_options(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = args.served_model_name or args.model
    log.info("starting the engine: model %s, pp=%d, policy %s %s", args.model, args.pp, args.policy, dict(args.param))
    engine = make_engine(args)
    try:
        info = {"pp": args.pp, "policy": args.policy, "policy_params": dict(args.param), "seed": args.seed,
                "source_model": args.model, "layer_split": args.layer_split, "threads": args.threads}
        warning = exposure_warning(args.host, options)
        if warning:
            log.warning("%s", warning)
        status = 0
        server: Any = None

        def fatal(code: int) -> None:   # the engine is down for good: stop serving, exit non-zero
            nonlocal status
            status = code
            server.should_exit = True

        app = build_app(engine, model_name=name, info=info, on_shutdown=engine.shutdown, options=options,
                        on_fatal=fatal)
        log.info("serving %s on http://%s:%d (%d KV pages of %d tokens, max_model_len %d)", name, args.host,
                 args.port, engine.num_pages, engine.page_size, engine.max_model_len)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                               timeout_graceful_shutdown=5))
        server.run()
    finally:
        engine.shutdown()
    return status

"""``longmem serve``: an OpenAI-style completions API over a run (needs the ``serve`` extra).

``POST /v1/completions`` takes ``prompt``, ``max_tokens``, ``temperature``,
``top_p``, ``stop``, ``seed``, ``logit_bias``, ``stream`` (server-sent events)
and the longmem extras ``top_k``, ``min_p``, ``repetition_penalty``,
``presence_penalty``, ``frequency_penalty`` and ``session`` (a name: the
prompt is added to that session's memory and the answer continues from it).
``GET /health`` says the server is up. Every error, whatever raised it (a bad
request, an unknown path, a fault inside the model), is JSON:
``{"error": {"message": ..., "type": ...}}``, 4xx for the client's mistakes and
500 (type ``server_error``) otherwise. With an API key set, the interactive docs
(``/docs``, ``/redoc``, ``/openapi.json``) are off.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import math
import os
import secrets
import socket
import sys
import time
import traceback
import uuid
from typing import Any

from longmem.generation.processors import SamplingConfig, build_processors
from longmem.generation.session import check_session_name
from longmem.serving.config import ServeConfig
from longmem.serving.engine import Engine, QueueFull

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as e:                                     # pragma: no cover - depends on the install
    raise ImportError("longmem serve needs the 'serve' extra: pip install 'longmem[serve]' "
                      "(FastAPI and uvicorn)") from e

# OpenAI fields accepted and ignored (they do not change what one model does)
_IGNORED = {"model", "user", "echo", "suffix", "logprobs", "best_of", "stream_options"}
_FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "logit_bias",
           "repetition_penalty", "presence_penalty", "frequency_penalty", "stream", "session", "n"}


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def _error_kind(status: int) -> str:
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")


class CatchAll:
    """ASGI middleware: an exception nobody handled becomes the documented JSON 500 (and a traceback on
    stderr). Starlette's own handler for ``Exception`` re-raises after answering, which makes uvicorn close
    the connection; this one does not, so the client's next request on it works."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as e:
            if scope["type"] != "http" or started:              # nothing JSON can be said any more
                raise
            print(f"longmem serve: internal error in {scope.get('method')} {scope.get('path')}:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            await _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")(scope, receive, send)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_json(raw: bytes) -> Any:
    """The request body; RequestError (400) for anything that is not plain JSON with finite numbers."""
    def refuse(text):
        raise RequestError(400, f"the request holds the number {text}; every number must be finite")

    def finite(text: str) -> float:
        v = float(text)
        return v if math.isfinite(v) else refuse(text)

    try:
        return json.loads(raw, parse_constant=refuse, parse_float=finite)
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply") from None
    except ValueError as e:                                    # JSONDecodeError, UnicodeDecodeError, digit limit
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None


def _number(body: dict, name: str, kind: type, default: Any) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    try:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
            raise TypeError
        return kind(v)
    except (TypeError, OverflowError):
        raise RequestError(400, f"'{name}' must be {'an integer' if kind is int else 'a finite number'} "
                                f"in range, got {_short(v)}") from None


def parse_request(body: Any, *, config: ServeConfig, vocab_size: int) -> tuple[str, SamplingConfig, str | None, bool]:
    """A completions request body -> (prompt, sampling, session, stream); RequestError on anything wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    unknown = set(body) - _FIELDS - _IGNORED
    if unknown:
        raise RequestError(400, f"unknown field(s) {sorted(unknown)}; accepted: {', '.join(sorted(_FIELDS))}")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "'prompt' must be a non-empty string")
    if len(prompt) > config.max_prompt_chars:
        raise RequestError(413, f"prompt has {len(prompt)} characters; this server accepts at most "
                                f"{config.max_prompt_chars}")
    if _number(body, "n", int, 1) != 1:
        raise RequestError(400, "'n' must be 1 (one completion per request)")
    max_tokens = _number(body, "max_tokens", int, 16)
    if not 0 <= max_tokens <= config.max_tokens_limit:
        raise RequestError(400, f"'max_tokens' must be in [0, {config.max_tokens_limit}], got {max_tokens}")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "'stop' must be a non-empty string or a list of at most 4 of them")
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict) or len(bias) > 300:
        raise RequestError(400, "'logit_bias' must be an object {token id: bias} with at most 300 entries")
    seed = body.get("seed")
    seed = secrets.randbelow(2**31) if seed is None else _number(body, "seed", int, 0)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"'stream' must be true or false, got {stream!r}")
    session = body.get("session")
    try:
        if session is not None:
            check_session_name(session)
        sampling = SamplingConfig(
            max_new_tokens=max_tokens, temperature=_number(body, "temperature", float, 1.0),
            top_p=_number(body, "top_p", float, 1.0), top_k=_number(body, "top_k", int, 0),
            min_p=_number(body, "min_p", float, 0.0),
            repetition_penalty=_number(body, "repetition_penalty", float, 1.0),
            presence_penalty=_number(body, "presence_penalty", float, 0.0),
            frequency_penalty=_number(body, "frequency_penalty", float, 0.0),
            logit_bias=bias, stop=stop, seed=seed)
        build_processors(sampling, vocab_size=vocab_size)                     # checks the logit_bias ids
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    return prompt, sampling, session, stream


def create_app(run, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app; the engine (model worker) starts with it and stops with it."""
    config = config or ServeConfig()
    api_key = config.api_key or os.environ.get("LONGMEM_API_KEY", "")
    engine = Engine(run, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()                                         # finish the queue, write the live sessions

    docs = {} if not api_key else {"docs_url": None, "redoc_url": None, "openapi_url": None}  # key: docs off
    app = FastAPI(title="longmem", version="1", lifespan=lifespan, **docs)
    app.state.engine = engine
    app.add_middleware(CatchAll)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):          # 404, 405 ... in the documented format
        return _error(exc.status_code, str(exc.detail), _error_kind(exc.status_code), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(422, "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}"
                                     for e in exc.errors()) or "invalid request")
    model_name = run.path.name
    vocab_size = run.model.config.vocab_size

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        given = request.headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), api_key.encode())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "memory": run.model.config.memory.kind, **engine.stats()}

    @app.post("/v1/completions")
    async def completions(request: Request):
        if not authorized(request):
            return _error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", "authentication_error")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_request_bytes:
            return _error(413, f"request body has {length} bytes; this server accepts at most {config.max_request_bytes} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > config.max_request_bytes:
                return _error(413, f"request body is over {config.max_request_bytes} bytes")
        try:
            prompt, sampling, session, stream = parse_request(parse_json(raw), config=config, vocab_size=vocab_size)
        except RequestError as e:
            return _error(e.status, e.message, e.kind)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        try:
            job = engine.submit(prompt, sampling, session=session,
                                on_piece=(lambda p: loop.call_soon_threadsafe(pieces.put_nowait, p)) if stream
                                else None)
        except QueueFull as e:
            return _error(503, str(e), "server_busy")
        if not stream:
            try:
                done = await asyncio.wrap_future(job.future)
            except ValueError as e:
                return _error(400, str(e))
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": done.text, "finish_reason": done.finish_reason,
                                 "logprobs": None}],
                    "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                              "total_tokens": done.prompt_tokens + done.completion_tokens},
                    **({"session": {**done.session, "memory_reset": done.memory_reset}} if done.session else {})}

        job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))

        def event(text: str, finish: str | None) -> str:
            chunk = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                     "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(chunk)}\n\n"

        async def events():
            try:
                while (piece := await pieces.get()) is not None:
                    yield event(piece, None)
                while not pieces.empty():                      # pieces queued before the end marker
                    piece = pieces.get_nowait()
                    if piece is not None:
                        yield event(piece, None)
                try:
                    done = job.future.result()
                    yield event("", done.finish_reason)
                except Exception as e:                         # reported in the stream: headers are sent
                    yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()                            # no-op when finished; stops it if the client left

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def check_port(host: str, port: int) -> None:
    """ValueError unless ``host:port`` can be bound now (as uvicorn binds it: SO_REUSEADDR set)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} is in use on {host}; pass --port with a free one") from None
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host and --port") from None


def serve(run, config: ServeConfig) -> None:
    """Run the app with uvicorn until interrupted (ValueError first if the address cannot be bound)."""
    import uvicorn
    check_port(config.host, config.port)
    if not config.loopback and not (config.api_key or os.environ.get("LONGMEM_API_KEY")):
        print(f"longmem serve: warning: listening on {config.host} without an API key; anyone who can reach "
              f"this address can use the model (set --api-key)", file=sys.stderr)
    app = create_app(run, config)
    print(f"longmem serve: {run.path} on http://{config.host}:{config.port} (POST /v1/completions, GET /health)",
          file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")

"""``longmem serve``: an OpenAI-style completions API over a run (needs the ``serve`` extra).

``POST /v1/completions`` takes ``prompt``, ``max_tokens``, ``temperature``,
``top_p``, ``stop``, ``seed``, ``logit_bias``, ``stream`` (server-sent events)
and the longmem extras ``top_k``, ``min_p``, ``repetition_penalty``,
``presence_penalty``, ``frequency_penalty`` and ``session`` (a name: the
prompt is added to that session's memory and the answer continues from it).
``GET /health`` says the server is up. Errors are 4xx with
``{"error": {"message": ..., "type": ...}}``.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import sys
import time
import uuid
from typing import Any

from longmem.generation.processors import SamplingConfig, build_processors
from longmem.generation.session import check_session_name
from longmem.serving.config import ServeConfig
from longmem.serving.engine import Engine, QueueFull

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
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


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def _number(body: dict, name: str, kind: type, default: Any) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise RequestError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    return kind(v)


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

    app = FastAPI(title="longmem", version="1", lifespan=lifespan)
    app.state.engine = engine
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
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"the request body is not valid JSON: {e}")
        try:
            prompt, sampling, session, stream = parse_request(body, config=config, vocab_size=vocab_size)
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


def serve(run, config: ServeConfig) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn
    if not config.loopback and not (config.api_key or os.environ.get("LONGMEM_API_KEY")):
        print(f"longmem serve: warning: listening on {config.host} without an API key; anyone who can reach "
              f"this address can use the model (set --api-key)", file=sys.stderr)
    app = create_app(run, config)
    print(f"longmem serve: {run.path} on http://{config.host}:{config.port} (POST /v1/completions, GET /health)",
          file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")

"""``longmem serve``: an OpenAI-compatible API over a run (needs the ``serve`` extra).

Routes (request and response models: ``schemas.py``; the OpenAPI page at ``/docs``):

- ``POST /v1/chat/completions``: ``messages`` rendered by the model's chat template (imported models) or as
  plain text (``turn_format``); ``stream`` sends ``chat.completion.chunk`` events ending with
  ``data: [DONE]``. With a session (``session``, or ``user``), the memory already holds the conversation,
  so only what it lacks is fed: see ``generation.chat.messages_to_feed`` for the rule.
- ``POST /v1/completions``: ``prompt`` continued; the same sampling fields and sessions.
- ``GET /v1/models``, ``GET /v1/models/{id}``: the one model served (the run directory's name).
- ``POST /v1/inspect`` and the page ``GET /inspect``: what the memory does over a text (``generation/inspect.py``).
- ``GET /v1/sessions``: the sessions in RAM and on disk. ``GET /health``: up (needs no key).

Every error, whatever raised it (a bad request, an unknown path or method, a fault inside the model), is
JSON ``{"error": {"message": ..., "type": ...}}``: 4xx for the client's mistakes, 500 (type
``server_error``) otherwise. With an API key every route but ``/health`` needs it: ``Authorization: Bearer
KEY`` (or ``X-API-Key``), and for the pages a browser can send, HTTP basic authentication with the key as
the password.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hmac
import json
import logging
import os
import secrets
import socket
import time
import uuid
from importlib import resources
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from longmem.generation.chat import message_format
from longmem.generation.processors import SamplingConfig, build_processors
from longmem.serving.config import ServeConfig
from longmem.serving.engine import ChatTurn, Completion, Engine, FinishReason, QueueFull, SessionNotFound, _Job
from longmem.serving.schemas import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk,
                                     ChatCompletionRequest, ChunkChoice, CompletionChoice, CompletionRequest, Delta,
                                     ErrorResponse, InspectRequest, InspectResponse, ModelCard, ModelList,
                                     RequestError, SessionInfo, SessionList, Usage, _Sampling, parse_json, validate)
from longmem.serving.schemas import Completion as CompletionResponse

try:
    from pydantic import BaseModel
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as e:                                     # pragma: no cover - depends on the install
    from longmem.utils import install_hint
    raise ImportError(f"longmem serve needs the 'serve' extra: {install_hint('serve')} (FastAPI and uvicorn)") from e

if TYPE_CHECKING:
    from longmem.runs import Run

log = logging.getLogger(__name__)

CHAT_MAX_TOKENS = 512                  # a chat reply's default max_tokens (capped by max_tokens_limit)
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 503)}


def _doc(model: type, description: str = "") -> dict[Any, Any]:
    """The documented responses of a route answering ``model`` (the routes return plain JSON themselves)."""
    return {**ERRORS, 200: {"model": model, **({"description": description} if description else {})}}


def _error(status: int, message: str, kind: str = "invalid_request_error",
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def _error_kind(status: int) -> str:
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")


class CatchAll:
    """ASGI middleware: an exception nobody handled becomes the documented JSON 500 (and its traceback in
    the log). Starlette's own handler for ``Exception`` re-raises after answering, which makes uvicorn close
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
            log.exception("internal error in %s %s:", scope.get("method"), scope.get("path"))
            await _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")(scope, receive, send)


# -- requests to library calls ---------------------------------------------------------------------------------
def _sampling(req: _Sampling, *, max_tokens: int, config: ServeConfig, vocab_size: int,
              stop: list[str] | None = None) -> SamplingConfig:
    """The SamplingConfig of a request (ValueError from the checks of SamplingConfig become a RequestError)."""
    if not 0 <= max_tokens <= config.max_tokens_limit:
        raise RequestError(400, f"'max_tokens' must be in [0, {config.max_tokens_limit}], got {max_tokens}")
    def given(value: float | None, default: float) -> float:
        return default if value is None else value

    try:
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    except ValueError:
        raise RequestError(400, f"'logit_bias' keys must be token ids, got {sorted(req.logit_bias or {})[:5]}") from None
    try:
        sampling = SamplingConfig(
            max_new_tokens=max_tokens, temperature=given(req.temperature, 1.0), top_p=given(req.top_p, 1.0),
            top_k=0 if req.top_k is None else req.top_k, min_p=given(req.min_p, 0.0),
            repetition_penalty=given(req.repetition_penalty, 1.0), presence_penalty=given(req.presence_penalty, 0.0),
            frequency_penalty=given(req.frequency_penalty, 0.0), logit_bias=bias,
            stop=list(dict.fromkeys([*(stop or []), *(req.stop or [])])),
            seed=secrets.randbelow(2**31) if req.seed is None else req.seed)
        build_processors(sampling, vocab_size=vocab_size)                     # checks the logit_bias ids
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    return sampling


def parse_request(body: Any, *, config: ServeConfig, vocab_size: int) -> tuple[str, SamplingConfig, str | None, bool]:
    """A completions request body -> (prompt, sampling, session, stream); RequestError on anything wrong."""
    req = validate(CompletionRequest, body)
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    if len(prompt) > config.max_prompt_chars:
        raise RequestError(413, f"prompt has {len(prompt)} characters; this server accepts at most "
                                f"{config.max_prompt_chars}")
    sampling = _sampling(req, max_tokens=16 if req.max_tokens is None else req.max_tokens, config=config,
                         vocab_size=vocab_size)
    return prompt, sampling, req.session_name, req.stream


def parse_chat_request(body: Any, *, config: ServeConfig, vocab_size: int, stop: list[str]
                       ) -> tuple[ChatCompletionRequest, list[dict[str, str]], SamplingConfig]:
    """A chat request body -> (request, messages as plain dicts, sampling with ``stop`` (the end-of-turn
    strings) before the request's own)."""
    req = validate(ChatCompletionRequest, body)
    if None not in (req.max_tokens, req.max_completion_tokens) and req.max_tokens != req.max_completion_tokens:
        raise RequestError(400, f"'max_tokens' ({req.max_tokens}) and 'max_completion_tokens' "
                                f"({req.max_completion_tokens}) differ; give one of them")
    messages = [m.plain() for m in req.messages]
    chars = sum(len(m["content"]) for m in messages)
    if chars > config.max_prompt_chars:
        raise RequestError(413, f"the messages have {chars} characters; this server accepts at most "
                                f"{config.max_prompt_chars}")
    given = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = min(CHAT_MAX_TOKENS, config.max_tokens_limit) if given is None else given
    return req, messages, _sampling(req, max_tokens=max_tokens, config=config, vocab_size=vocab_size, stop=stop)


def _data(obj: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj.model_dump() if hasattr(obj, 'model_dump') else obj)}\n\n"


def _without_empty_session(d: dict[str, Any]) -> dict[str, Any]:
    if d.get("session") is None:
        d.pop("session", None)
    return d


def _session_info(done: Completion) -> SessionInfo | None:
    if done.session is None:
        return None
    return SessionInfo(**done.session, memory_reset=done.memory_reset, messages_fed=done.messages_fed)


def _usage(done: Completion) -> Usage:
    return Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                 total_tokens=done.prompt_tokens + done.completion_tokens)


def _openapi_with_bodies(app: FastAPI, bodies: dict[tuple[str, str], type[BaseModel]]) -> dict[str, Any]:
    """The OpenAPI document with the request bodies the routes parse themselves (``parse_json``, then the
    model): FastAPI only documents bodies it parses."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for (path, method), model in bodies.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
            doc["paths"][path][method]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = doc
    return app.openapi_schema


# -- the app ---------------------------------------------------------------------------------------------------
def create_app(run: Run, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app; the engine (model worker) starts with it and stops with it."""
    config = config or ServeConfig()
    api_key = config.api_key or os.environ.get("LONGMEM_API_KEY", "")
    renderer, end_of_turn = message_format(run.tokenizer, turn_format=config.turn_format or None)
    engine = Engine(run, config)
    model_name = run.path.name
    created = int(run.path.stat().st_mtime)
    vocab_size = run.model.config.vocab_size

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()                                         # finish the queue, write the live sessions

    app = FastAPI(title="longmem", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  description=f"OpenAI-compatible API over the run {model_name} (memory: "
                              f"{run.model.config.memory.kind}), with per-session memory.")
    app.state.engine = engine
    app.add_middleware(CatchAll)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return _error(exc.status, exc.message, exc.kind, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):          # 404, 405 ... in the documented format
        return _error(exc.status_code, str(exc.detail), _error_kind(exc.status_code),
                      headers=dict(exc.headers) if exc.headers else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _error(422, "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}"
                                     for e in exc.errors()) or "invalid request")

    def key_given(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:]
        if auth.lower().startswith("basic "):                   # a browser: any user name, the key as password
            try:
                return base64.b64decode(auth[6:], validate=True).decode("utf-8").partition(":")[2]
            except ValueError:
                return ""
        return request.headers.get("x-api-key", "")

    def check_key(request: Request, *, page: bool) -> None:
        if api_key and not hmac.compare_digest(key_given(request).encode(), api_key.encode()):
            raise RequestError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                               "authentication_error",
                               headers={"WWW-Authenticate": 'Basic realm="longmem", charset="UTF-8"'} if page else None)

    async def api_key_dep(request: Request) -> None:
        check_key(request, page=False)

    async def page_key_dep(request: Request) -> None:
        check_key(request, page=True)

    api = [Depends(api_key_dep)]
    page = [Depends(page_key_dep)]

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_request_bytes:
            raise RequestError(413, f"request body has {length} bytes; this server accepts at most "
                                    f"{config.max_request_bytes} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > config.max_request_bytes:
                raise RequestError(413, f"request body is over {config.max_request_bytes} bytes")
        return parse_json(raw)

    async def result(future) -> Any:
        """The engine's answer; its refusals as the client's errors."""
        try:
            return await asyncio.wrap_future(future)
        except SessionNotFound as e:
            raise RequestError(404, str(e.args[0]), "not_found_error") from None
        except ValueError as e:
            raise RequestError(400, str(e)) from None

    def submit(*args: Any, **kwargs: Any) -> tuple[_Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        stream = kwargs.pop("stream")

        def on_piece(piece: str) -> None:                      # called in the model's thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        try:
            job = engine.submit(*args, on_piece=on_piece if stream else None, **kwargs)
        except QueueFull as e:
            raise RequestError(503, str(e), "server_busy") from None
        if stream:
            job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        return job, pieces

    async def stream_response(job: _Job, pieces: asyncio.Queue, *, start: list[Any], piece: Callable[[str], Any],
                              end: Callable[[Completion], list[Any]]) -> StreamingResponse:
        """Server-sent events: ``start``, one event per text piece, ``end(completion)``, ``data: [DONE]``. A
        request the engine refuses before the first piece (a bad session file) is a JSON error instead."""
        first = await pieces.get()
        if first is None:
            await result(job.future)                           # raises the refusal as a 4xx

        async def events() -> AsyncIterator[str]:
            try:
                for obj in start:
                    yield _data(obj)
                p = first
                while p is not None:
                    yield _data(piece(p))
                    p = await pieces.get()
                try:
                    done = job.future.result()
                    for obj in end(done):
                        yield _data(obj)
                except Exception as e:                         # reported in the stream: headers are sent
                    yield _data({"error": {"message": str(e), "type": "server_error"}})
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()                            # no-op when finished; stops it if the client left

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "memory": run.model.config.memory.kind, **engine.stats()}

    @app.get("/v1/models", dependencies=api, responses=_doc(ModelList))
    async def models():
        return ModelList(data=[ModelCard(id=model_name, created=created)]).model_dump()

    @app.get("/v1/models/{model_id}", dependencies=api, responses=_doc(ModelCard))
    async def model_card(model_id: str):
        if model_id != model_name:
            raise RequestError(404, f"no model {model_id!r}; this server serves {model_name!r}", "not_found_error")
        return ModelCard(id=model_name, created=created).model_dump()

    @app.post("/v1/completions", dependencies=api, responses=_doc(CompletionResponse))
    async def completions(request: Request):
        prompt, sampling, session, stream = parse_request(await read_json(request), config=config,
                                                          vocab_size=vocab_size)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        job, pieces = submit(prompt, sampling, session=session, stream=stream)
        if not stream:
            done = await result(job.future)
            return _without_empty_session(CompletionResponse(
                id=rid, created=now, model=model_name, usage=_usage(done), session=_session_info(done),
                choices=[CompletionChoice(text=done.text, finish_reason=done.finish_reason)]).model_dump())

        def chunk(text: str, finish: FinishReason | None = None) -> dict[str, Any]:
            return _without_empty_session(CompletionResponse(
                id=rid, created=now, model=model_name,
                choices=[CompletionChoice(text=text, finish_reason=finish)]).model_dump(exclude={"usage"}))

        return await stream_response(job, pieces, start=[], piece=chunk,
                                     end=lambda done: [chunk("", done.finish_reason)])

    @app.post("/v1/chat/completions", dependencies=api,
              responses=_doc(ChatCompletion, "the reply, or with stream: server-sent ChatCompletionChunk events "
                                             "ending with data: [DONE]"))
    async def chat_completions(request: Request):
        req, messages, sampling = parse_chat_request(await read_json(request), config=config,
                                                     vocab_size=vocab_size, stop=end_of_turn)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        job, pieces = submit(None, sampling, session=req.session_name, stream=req.stream,
                             chat=ChatTurn(messages=messages, renderer=renderer))
        if not req.stream:
            done = await result(job.future)
            return _without_empty_session(ChatCompletion(
                id=rid, created=now, model=model_name, usage=_usage(done), session=_session_info(done),
                choices=[ChatChoice(message=AssistantMessage(content=done.text),
                                    finish_reason=done.finish_reason)]).model_dump())

        def chunk(delta: Delta, finish: FinishReason | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=now, model=model_name,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)])

        def end(done: Completion) -> list[Any]:
            last = [chunk(Delta(), done.finish_reason)]
            if req.stream_options and req.stream_options.include_usage:
                last.append(ChatCompletionChunk(id=rid, created=now, model=model_name, choices=[], usage=_usage(done)))
            return last

        return await stream_response(job, pieces, start=[chunk(Delta(role="assistant", content=""))],
                                     piece=lambda text: chunk(Delta(content=text)), end=end)

    @app.get("/v1/sessions", dependencies=api, responses=_doc(SessionList))
    async def sessions():
        return SessionList(data=await result(engine.sessions())).model_dump()

    @app.post("/v1/inspect", dependencies=api, responses=_doc(InspectResponse))
    async def inspect(request: Request):
        req = validate(InspectRequest, await read_json(request))
        n = len(run.tokenizer.encode(req.text))
        if n > config.max_inspect_tokens or len(req.text) > config.max_prompt_chars:
            raise RequestError(413, f"the text has {n} tokens and {len(req.text)} characters; /v1/inspect reads at "
                                    f"most {config.max_inspect_tokens} tokens and {config.max_prompt_chars} characters")
        try:
            future = engine.inspect(req.text, session=req.session, top=req.top, layers=req.layers)
        except QueueFull as e:
            raise RequestError(503, str(e), "server_busy") from None
        return JSONResponse(await result(future))

    @app.get("/inspect", dependencies=page, response_class=HTMLResponse)
    async def inspect_page():
        return HTMLResponse(resources.files("longmem.serving").joinpath("static/inspect.html").read_text("utf-8"))

    bodies: dict[tuple[str, str], type[BaseModel]] = {("/v1/completions", "post"): CompletionRequest,
                                                      ("/v1/chat/completions", "post"): ChatCompletionRequest,
                                                      ("/v1/inspect", "post"): InspectRequest}

    @app.get("/openapi.json", dependencies=page, include_in_schema=False)
    async def openapi():
        return JSONResponse(_openapi_with_bodies(app, bodies))

    @app.get("/docs", dependencies=page, include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="longmem API")

    @app.get("/redoc", dependencies=page, include_in_schema=False)
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title="longmem API")

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


def serve(run: Run, config: ServeConfig) -> None:
    """Run the app with uvicorn until interrupted (ValueError first if the address cannot be bound)."""
    import uvicorn
    check_port(config.host, config.port)
    if not config.loopback and not (config.api_key or os.environ.get("LONGMEM_API_KEY")):
        log.warning("listening on %s without an API key; anyone who can reach this address can use the model "
                    "(set --api-key)", config.host)
    app = create_app(run, config)
    log.info("%s on http://%s:%d (POST /v1/chat/completions, /v1/completions; GET /v1/models, /inspect, /docs, "
             "/health)", run.path, config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")

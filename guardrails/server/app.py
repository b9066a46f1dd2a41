"""The FastAPI application: OpenAI-compatible routes in front of one :class:`ModelWorker`.

Every /v1 route checks the API key (when one is set) and the body size before parsing; every
failure is OpenAI's error shape with a status that says whose fault it was (4xx: the request,
429: come back later, 5xx: the server). Parsing, image decoding and moderation run in the thread
pool, so the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from guardrails.server import protocol
from guardrails.server.config import ServerConfig
from guardrails.server.errors import RequestError
from guardrails.server.worker import Answer, ModelWorker, Pending

STATIC = Path(__file__).with_name("static")


def create_app(guarded: Any | None, config: ServerConfig, moderator: Any | None = None) -> FastAPI:
    """The server for ``guarded`` (a GuardedModel, or None with ``moderator`` only: moderation-only).

    The model worker starts with the app (its lifespan) and stops with it, after letting the
    requests in flight finish for ``config.shutdown_grace_s``.
    """
    if guarded is None and moderator is None:
        raise ValueError("create_app needs a guarded model, a moderator, or both")
    if guarded is not None and config.model_name is None:
        config = config.replace(model_name=type(guarded.model).__name__)
    if guarded is None and config.model_name is not None:
        config = config.replace(model_name=None)
    worker = ModelWorker(guarded, config) if guarded is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if worker is not None:
            worker.start()
        if moderator is not None:
            await run_in_threadpool(moderator.load)  # detector and OCR engine loaded once, before the first request
        yield
        if worker is not None:
            await run_in_threadpool(worker.close, config.shutdown_grace_s)

    app = FastAPI(title="mllm-guardrails", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.config, app.state.moderator = worker, config, moderator

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = "no such route; the API is under /v1 (chat/completions, moderations, models)" if e.status_code == 404 else str(e.detail)
        return JSONResponse(RequestError(e.status_code, msg).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        err = RequestError(500, f"internal error: {type(e).__name__}: {e}")
        return JSONResponse(err.body(), status_code=500)

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                               code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        check_key(request)
        limit = config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"the request body is {int(declared)} bytes, above this server's limit of {limit}")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise RequestError(413, f"the request body is above this server's limit of {limit} bytes")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:  # also bad UTF-8, integers of over 4300 digits, deep nesting
            raise RequestError(400, f"the request body is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = worker is None or worker.alive
        body = {"status": "ok" if ok else "unavailable", "model": config.model_name,
                "defenses": [type(d).__name__ for d in guarded.defenses] if guarded is not None else [],
                "multimodal": bool(guarded is not None and guarded.engine.multimodal),
                "queue": worker.queued if worker is not None else 0, "running": worker.running if worker is not None else 0,
                "api_key_required": config.api_key is not None,
                "moderation": moderator.describe() if moderator is not None else None}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        data = [{"id": config.model_name, "object": "model", "created": 0, "owned_by": "guardrails"}] if config.model_name else []
        return {"object": "list", "data": data}

    @app.post("/v1/moderations")
    async def moderations(request: Request) -> dict[str, Any]:
        body = await read_json(request)
        if moderator is None:
            raise RequestError(404, "this server was started with --no-moderation: it has no moderation endpoint; restart it without that flag")
        return await run_in_threadpool(moderator.moderate, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request)
        if worker is None or guarded is None:
            raise RequestError(404, "this server runs --moderation-only: it has no chat model; use POST /v1/moderations",
                               code="model_not_found")
        worker.check_capacity()  # before decoding images: a full server refuses cheaply
        job = await run_in_threadpool(protocol.parse_chat, body, config, multimodal=guarded.engine.multimodal)
        pending = worker.submit(job, asyncio.get_running_loop())
        if job.stream:
            return StreamingResponse(_sse(pending, config), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        # Starlette does not cancel a plain handler when its client leaves: watch, so the generation stops.
        watch = asyncio.create_task(_cancel_on_disconnect(request, pending))
        try:
            kind, value = await _next_event(pending, config)
        finally:
            watch.cancel()
            pending.cancel()  # no-op once answered
        if kind == "error":
            raise value
        return JSONResponse(_completion(pending, value, config))

    return app


async def _cancel_on_disconnect(request: Request, pending: Pending, every_s: float = 0.25) -> None:
    """Cancel the request once its client has left, and wake its handler (the worker posts nothing
    for a cancelled request), so neither the generation nor the handler outlives the client."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    pending.cancel()
    pending.events.put_nowait(("error", RequestError(400, "the client closed the connection", code="client_closed")))


async def _next_event(pending: Pending, config: ServerConfig) -> tuple[str, Any]:
    """The request's next event, or a 503 once ``request_timeout_s`` has passed since it was queued."""
    left = config.request_timeout_s - (time.monotonic() - pending.enqueued)
    try:
        return await asyncio.wait_for(pending.events.get(), timeout=max(left, 0.001))
    except asyncio.TimeoutError:
        pending.cancel()
        return "error", RequestError(503, f"no answer within {config.request_timeout_s:g} s; the server is overloaded "
                                          "or the request asked for too many tokens", code="timeout")


def _completion(pending: Pending, a: Answer, config: ServerConfig) -> dict[str, Any]:
    return protocol.completion(pending.job, config.model_name or "", a.text, a.finish_reason, protocol.trace(a.result),
                               protocol.usage(a.prompt_tokens, a.completion_tokens))


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(pending: Pending, config: ServerConfig) -> AsyncIterator[str]:
    """OpenAI's chunk stream; the last chunk carries finish_reason and the guard trace."""
    job, model = pending.job, config.model_name or ""
    try:
        yield _event(protocol.chunk(job, model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await _next_event(pending, config)
            if kind == "chunk":
                yield _event(protocol.chunk(job, model, {"content": value}))
                continue
            if kind == "error":
                yield _event(value.body())
            else:
                use = protocol.usage(value.prompt_tokens, value.completion_tokens)
                yield _event(protocol.chunk(job, model, {}, value.finish_reason, guardrails=protocol.trace(value.result)))
                if job.include_usage:
                    yield _event(protocol.chunk(job, model, None, usage=use))
            break
        yield "data: [DONE]\n\n"
    finally:
        pending.cancel()  # the client left (or the stream ended): generation stops at the next token

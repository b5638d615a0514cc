"""``allmos serve``: the FastAPI application and its start-up.

Start-up order: the engine-core process is launched and builds the engine; the front end loads the
tokenizer from the folder the core resolved; only then does uvicorn bind the port (so a listening
server is a ready one). Shutdown (Ctrl-C / SIGTERM) stops uvicorn, then the core.

Authentication (``--api-key`` or ``ALLMOS_API_KEY``) covers ``/v1/*``, ``/tokenize`` and ``/detokenize``;
``/``, ``/health``, ``/version`` and ``/metrics`` stay open (as in vLLM). Keys are compared through
their SHA-256 digests with ``hmac.compare_digest`` (constant time whatever the lengths).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib.resources
import logging
import os
import time
from dataclasses import dataclass, field

import msgspec
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from allmos import __version__
from allmos.server.completions import ChatEndpoint, CompletionEndpoint
from allmos.server.engine_client import EngineClient
from allmos.server.metrics import ServerMetrics
from allmos.server.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    bad_request,
    decode_body,
)
from allmos.server.output_processor import OutputProcessor
from allmos.server.serving import OpenAIServing, ServingConfig, chat_messages, to_api_error

logger = logging.getLogger("allmos.server")

_JSON = msgspec.json.Encoder()
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ServerArgs:
    """Everything ``allmos serve`` takes (vLLM's flag names); ``engine`` holds the EngineConfig keys."""

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: tuple[str, ...] = ()
    chat_template: str | None = None
    log_level: str = "info"
    max_queued_requests: int = 4096
    max_request_bytes: int = 4 << 20
    stats_interval_s: float = 5.0
    engine: dict = field(default_factory=dict)

    def served_names(self) -> tuple[str, ...]:
        if self.served_model_name:
            return tuple(self.served_model_name)
        if self.model is None:
            from allmos.models.default_model import DEFAULT_MODEL_NAME
            return (DEFAULT_MODEL_NAME,)
        return (self.model,)


@dataclass
class ServerState:
    args: ServerArgs
    client: EngineClient
    serving: OpenAIServing
    metrics: ServerMetrics
    completions: CompletionEndpoint = field(init=False)
    chat: ChatEndpoint = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.completions = CompletionEndpoint(self.serving)
        self.chat = ChatEndpoint(self.serving)


# ---------------------------------------------------------------------- middleware and errors
class APIKeyMiddleware:
    """Pure ASGI (so streaming responses pass through untouched): 401 unless ``Authorization: Bearer KEY``."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(f"Bearer {api_key}".encode()).digest()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and _needs_key(scope["path"]):
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(hashlib.sha256(header).digest(), self._digest):
                error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                 "invalid_request_error", None, "invalid_api_key")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _needs_key(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def json_response(payload, status: int = 200) -> Response:
    return Response(_JSON.encode(payload), status_code=status, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = APIError(413, f"the request body exceeds the limit of {limit} bytes", "invalid_request_error",
                         None, "request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def until_disconnected(request: Request, work):
    """Await ``work``; if the client disconnects first, cancel it (its requests are aborted) and return None."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()


# ---------------------------------------------------------------------- the application
def build_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        """The stats log line while serving; the engine core stops with the server (before uvicorn
        re-raises a captured SIGTERM, which would end the process at once)."""
        stats = asyncio.create_task(_log_stats(state.metrics, state.args.stats_interval_s))
        try:
            yield
        finally:
            stats.cancel()
            await state.client.shutdown()

    app = FastAPI(title="allmos", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.server = state
    _add_error_handlers(app)
    _add_info_routes(app, state)
    _add_generation_routes(app, state)
    if state.args.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=state.args.api_key)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            error = APIError(404, f"Invalid URL ({request.method} {request.url.path})", "invalid_request_error",
                             None, "unknown_url")
        else:
            error = APIError(exc.status_code, str(exc.detail), "invalid_request_error")
        return error_response(error)

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", "server_error"))


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    chat_page = importlib.resources.files("allmos.server").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(chat_page)

    @app.get("/health")
    async def health():
        if not state.client.is_alive:
            return error_response(APIError(503, f"the engine is not running: {state.client.dead_reason}",
                                           "server_error", None, "engine_unavailable"))
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return json_response({"version": __version__})

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        info = state.client.ready
        data = [{"id": name, "object": "model", "created": state.created, "owned_by": "allmos",
                 "root": info.model_folder, "parent": None, "max_model_len": info.max_model_len}
                for name in state.args.served_names()]
        return json_response({"object": "list", "data": data})

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = decode_body(await read_body(request, state.args.max_request_bytes), TokenizeRequest)
        serving = state.serving
        serving.check_model(req.model)
        _need_tokenizer(serving)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            text = state.chat.prompt_text(chat_messages(req.messages), add_generation_prompt=req.add_generation_prompt)
            tokens = serving.encode(text)
        else:
            tokens = serving.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return json_response({"count": len(tokens), "max_model_len": state.client.ready.max_model_len,
                              "tokens": tokens})

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = decode_body(await read_body(request, state.args.max_request_bytes), DetokenizeRequest)
        serving = state.serving
        serving.check_model(req.model)
        _need_tokenizer(serving)
        vocab = state.client.ready.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
        return json_response({"prompt": serving.tokenizer.decode(req.tokens)})


def _need_tokenizer(serving: OpenAIServing) -> None:
    if serving.tokenizer is None:
        raise bad_request("this model has no tokenizer: send prompts as token ids", "prompt")


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    async def generate(request: Request, endpoint, kind: type):
        req = decode_body(await read_body(request, state.args.max_request_bytes), kind)
        job = endpoint.admit(req)
        cleanup = BackgroundTask(state.client.abort, [s.request_id for s in job.states])
        if req.stream:
            return StreamingResponse(endpoint.stream(job), media_type="text/event-stream", headers=_SSE_HEADERS,
                                     background=cleanup)
        try:
            result = await until_disconnected(request, endpoint.full(job))
        except Exception as exc:  # rejected by the core (400), engine gone (503), ...
            raise to_api_error(exc) from None
        finally:
            state.client.abort([s.request_id for s in job.states])
        if result is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return json_response(result)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, state.completions, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, state.chat, ChatCompletionRequest)


# ---------------------------------------------------------------------- running
def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file path or the Jinja template itself (as vLLM)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def _load_tokenizer(ready) -> object | None:
    """The model's tokenizer, from the folder the core resolved (None when the engine found none)."""
    if not ready.has_tokenizer:
        logger.warning("no tokenizer in %s: prompts must be token ids and outputs carry no text", ready.model_folder)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ready.model_folder, trust_remote_code=False)


async def start_state(args: ServerArgs) -> ServerState:
    names = args.served_names()
    metrics = ServerMetrics(names[0])
    engine_config = {"model": args.model, **args.engine}
    client = await EngineClient.start(engine_config, OutputProcessor(metrics), args.log_level)
    metrics.watch_core_process(client.pid)
    tokenizer = _load_tokenizer(client.ready)
    config = ServingConfig(names, args.engine.get("max_num_seqs", 512),
                           args.max_queued_requests, load_chat_template(args.chat_template))
    serving = OpenAIServing(client, tokenizer, config, metrics)
    return ServerState(args, client, serving, metrics)


async def _log_stats(metrics: ServerMetrics, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        metrics.log_stats()


async def serve(args: ServerArgs) -> None:
    import uvicorn

    state = await start_state(args)
    config = uvicorn.Config(build_app(state), host=args.host, port=args.port, log_level=args.log_level.lower(),
                            access_log=args.log_level.lower() == "debug", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    logger.info("allmos %s serving %s on http://%s:%d (engine core pid %d)", __version__,
                ", ".join(args.served_names()), args.host, args.port, state.client.pid)
    try:
        await server.serve()
    finally:  # uvicorn never started (port taken): the lifespan did not run
        await state.client.shutdown()


def run_server(args: ServerArgs) -> None:
    """Blocking entry point of ``allmos serve``."""
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("allmos").setLevel(args.log_level.upper())
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(args))
    except RuntimeError as exc:
        if "engine" not in str(exc):
            raise
        logger.error("%s", exc)
        raise SystemExit(1) from None


__all__ = ["ServerArgs", "build_app", "run_server", "serve", "start_state"]

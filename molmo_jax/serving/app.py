"""The FastAPI app: OpenAI-style chat completions over the continuous-batching engine, and the page.

    app = create_app(predictor, ServeConfig(engine=EngineConfig(max_batch=8)))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: POST /v1/chat/completions (openai_format.py: body, streaming, points), GET /v1/models,
GET /health, GET / (page.html). The engine thread starts and stops with the app (lifespan).

Every refused request is a JSON {"error": {"message", "type", "code"}} whose message names the
problem, and no request can hold the server: the body must arrive within `body_timeout` seconds
and `max_body_bytes` (408 / 413), images are fetched within the fetch deadline and size cap and
refused over `max_pixels` (400 / 413) before their pixels are decoded, a prompt that does not fit
the context is a 400, a full queue a 503 with Retry-After, an answer not finished within
`request_timeout` a 504 (streamed: an error event), and a client that goes away frees its row.
Image fetching and preprocessing run in worker threads, so they never stall the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import pathlib
import socket
import threading
import time

import uvicorn

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from data_pipelines import images
from data_pipelines.fetch import FetchConfig
from molmo_jax.inference.drawing import find_points
from molmo_jax.inference.predictor import IMAGE_FETCH, Predictor, Request, RequestError, read_image_source
from molmo_jax.serving import openai_format as api
from molmo_jax.serving.batcher import Engine, EngineConfig, Job, PromptTooLong, QueueFull

log = logging.getLogger(__name__)
PAGE = pathlib.Path(__file__).with_name("page.html")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Limits of the server (the command's flags). default_max_tokens: when a request gives none
    (cut to what its prompt leaves of the context)."""
    engine: EngineConfig = EngineConfig()
    model_name: str = "molmo"
    max_body_bytes: int = 16 * 2**20
    max_pixels: int = 25_000_000
    body_timeout: float = 10.0
    request_timeout: float = 300.0
    default_max_tokens: int = 200
    retry_after: int = 1  # seconds, in the 503 of a full queue
    fetch: FetchConfig = IMAGE_FETCH


async def read_body(request: HttpRequest, max_bytes: int, timeout: float) -> bytes:
    """The request body within `timeout` seconds and `max_bytes`, else ApiError 408 / 413."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isascii() or not declared.isdigit():
            raise api.ApiError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > max_bytes:
            raise api.ApiError(413, f"body of {int(declared)} bytes is over the limit of {max_bytes} "
                                    f"(--max-body-mb)")
    parts, size = [], 0

    async def collect():
        nonlocal size
        async for part in request.stream():
            size += len(part)
            if size > max_bytes:
                raise api.ApiError(413, f"body is over the limit of {max_bytes} bytes (--max-body-mb)")
            parts.append(part)

    try:
        await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise api.ApiError(408, f"request body not received within {timeout:g} s ({size} bytes came)",
                           "timeout") from None
    return b"".join(parts)


def image_size_from_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header, None when PIL does not recognise the bytes (load_image
    then names the problem)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def prepare(predictor: Predictor, chat: api.ChatRequest, config: ServeConfig) -> tuple[dict, tuple | None]:
    """-> (the model inputs, (width, height) of the image or None). Blocking: fetches, decodes."""
    pixels, size = None, None
    if chat.image is not None:
        try:
            data = read_image_source(chat.image, config.fetch)
        except RequestError as e:
            raise api.ApiError(400, str(e)) from None
        header = image_size_from_header(data)
        if header and header[0] * header[1] > config.max_pixels:
            raise api.ApiError(413, f"image is {header[0]}x{header[1]} = {header[0] * header[1]} pixels, over "
                                    f"the limit of {config.max_pixels} (--max-pixels)")
        try:
            pixels = images.load_image(data, max_pixels=config.max_pixels)
        except images.ImageDecodeError as e:
            raise api.ApiError(400, f"image: {e}") from None
        size = (pixels.shape[1], pixels.shape[0])
    try:
        return predictor.prepare(Request(chat.prompt, pixels, chat.style)), size
    except (RequestError, ValueError, KeyError) as e:
        raise api.ApiError(400, f"request: {e}") from None


def create_app(predictor: Predictor, config: ServeConfig = ServeConfig()) -> FastAPI:
    engine = Engine(predictor, config.engine)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        engine.start()
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="molmo-jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(api.ApiError)
    async def api_error(_, e: api.ApiError):
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        log.exception("request failed")
        return JSONResponse(api.ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body(), 500)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        alive = engine.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped", **engine.load()}, 200 if alive else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "owned_by": "molmo-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = api.parse_json(await read_body(request, config.max_body_bytes, config.body_timeout))
        chat = api.parse_chat_request(body)
        example, size = await run_in_threadpool(prepare, predictor, chat, config)
        n_prompt = len(example["input_tokens"])
        max_tokens = chat.max_tokens or max(1, min(config.default_max_tokens, engine.max_new_tokens(n_prompt)))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_event(kind, payload):  # engine thread -> this request's event loop
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        job = Job(example, max_tokens, on_event, chat.temperature, chat.top_p, chat.stop)
        try:
            engine.submit(job)
        except PromptTooLong as e:
            raise api.ApiError(400, str(e)) from None
        except QueueFull as e:
            raise api.ApiError(503, f"server busy: {e}; retry later", "server_busy",
                               {"Retry-After": str(config.retry_after)}) from None
        cid = api.completion_id()
        deadline = loop.time() + config.request_timeout

        def finished(result) -> tuple[str, list]:
            points = api.points_in_pixels(find_points(result.text), *size) if size else []
            return result.text, points

        if chat.stream:
            async def stream():
                try:
                    yield api.sse(api.chunk(cid, config.model_name, {"role": "assistant", "content": ""}))
                    while True:
                        try:
                            kind, payload = await asyncio.wait_for(events.get(), max(0.0, deadline - loop.time()))
                        except asyncio.TimeoutError:
                            yield api.sse(_timeout(config).body())
                            break
                        if kind == "delta":
                            yield api.sse(api.chunk(cid, config.model_name, {"content": payload}))
                        elif kind == "error":
                            yield api.sse(api.ApiError(500, payload, "server_error").body())
                            break
                        else:
                            _, points = finished(payload)
                            yield api.sse(api.chunk(cid, config.model_name, {"points": points} if points else {},
                                                    payload.finish_reason,
                                                    api.usage(n_prompt, len(payload.tokens))))
                            break
                    yield api.sse("[DONE]")
                finally:
                    job.cancelled = True  # the client went away (or all is sent: then this changes nothing)

            return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), min(1.0, max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    if loop.time() >= deadline:
                        raise _timeout(config) from None
                    if await request.is_disconnected():
                        raise api.ApiError(499, "client disconnected") from None
                    continue
                if kind == "error":
                    raise api.ApiError(500, payload, "server_error")
                if kind == "done":
                    text, points = finished(payload)
                    return api.completion(cid, config.model_name, text, payload.finish_reason, points, n_prompt,
                                          len(payload.tokens))
        finally:
            job.cancelled = True

    return app


@contextlib.contextmanager
def serving_in_thread(app: FastAPI, host: str = "127.0.0.1", start_timeout: float = 60.0):
    """Serve `app` with uvicorn in a background thread on a free port of `host` (tests,
    benchmarks) -> its base URL; stops (lifespan included) when the block ends."""
    sock = socket.socket()
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server did not start within {start_timeout:g} s")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _timeout(config: ServeConfig) -> api.ApiError:
    return api.ApiError(504, f"no answer within {config.request_timeout:g} s (--request-timeout)", "timeout")

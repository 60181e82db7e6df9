"""The ASGI application of ``resfit serve``: routes, limits, token check and metrics.

The handlers take a Starlette ``Request`` and return a ``Response``, so the same service runs
as a plain Starlette app (the default) or as a FastAPI app (``framework="fastapi"``).
bench/asgi_stack.py measured both on uvicorn with the same handlers, batcher and engine (2
cores of an AMD EPYC Zen 4, 16 clients): Starlette answered 849 +-44 against FastAPI's 707
+-36 requests/s around a no-op model, and 402 +-16 against 354 +-33 images/s with a CIFAR
ResNet-56 (LitServe, with its own batching and worker process: 290 and 111). FastAPI's share
is its per-request dependency resolution; what it gives, the OpenAPI schema and ``/docs``, the
Starlette app keeps: FastAPI generates the schema once, from the same route table, at startup.

Metrics: one process has its own Prometheus registry, so a test or a second app in the same
process counts apart. Under ``--workers N`` a scrape reaches one worker, so the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` (a temporary folder it owns) and prometheus_client's
multiprocess mode has every worker write its values there; ``/metrics`` then answers the sum
over the workers (the queue depth: over the live ones).
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.formparsers import MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse as _StrictJSONResponse
from starlette.responses import Response

from ...data.decode import MAX_PIXELS
from ...data.paths import display_text
from ...inference.predictor import Predictor
from .batching import (
    BadImage,
    Batcher,
    QueueFull,
    decode_each,
    decode_image_bytes,
    image_pixels,
)
from .explain import class_index, data_url, overlay_runner
from .page import index

__all__ = ["FRAMEWORKS", "ServeOptions", "create_app"]

FRAMEWORKS = ("fastapi", "starlette")
log = logging.getLogger("resfit")

# Every path needs the token when one is set, but the page at / (static HTML, no data of the
# run): a browser opening a URL cannot send the token, so the page asks for it and sends it.
_OPEN_PATHS = ("/",)
_KNOWN_PATHS = (
    "/",
    "/v1/predict",
    "/v1/embed",
    "/v1/explain",
    "/v1/predict-video",
    "/healthz",
    "/readyz",
)


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_body_mb: float = 20.0
    token: str | None = None
    decode_threads: int = 4
    max_pixels: int = MAX_PIXELS  # per image, from its header, before decoding
    max_images: int = 64  # per request
    max_request_pixels: int = 4 * MAX_PIXELS  # per request, all its images together


def _escaped(value: object) -> object:
    """``value`` with every string made printable UTF-8 (:func:`display_text`)."""
    if isinstance(value, str):
        return display_text(value)
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    return value


class JSONResponse(_StrictJSONResponse):
    """Starlette's JSON response, valid for any text: a class, file or run name that is not
    UTF-8 (a folder named with Latin-1 bytes) is shown with ``\\xNN`` escapes, as the CSVs and
    logs show it, instead of failing the strict UTF-8 encoding (a 500)."""

    def render(self, content: object) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return super().render(_escaped(content))


class _Metrics:
    def __init__(self) -> None:
        # Multiprocess mode (prometheus_client reads the variable when it is imported): the
        # values go to files, and a scrape collects every worker's files into a new registry.
        self.shared = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "resfit_requests", "HTTP requests by path and status code", ["path", "code"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "resfit_request_seconds", "Request latency (seconds) by path", ["path"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        self.batch_size = Histogram(
            "resfit_batch_size", "Images per forward pass", registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "resfit_batch_seconds", "Seconds per forward pass", registry=r
        )
        self.queue_depth = Gauge("resfit_queue_depth", "Images waiting for the model", registry=r,
                                 multiprocess_mode="livesum")  # fmt: skip

    def scrape(self) -> bytes:
        """The Prometheus text of this process, or of all workers in multiprocess mode."""
        if not self.shared:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)


def _error(status: int, reason: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers or None)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes ``limit`` bytes (chunked uploads too)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_files(request: Request, body: bytes, limit: int) -> list[tuple[str, bytes]]:
    async def stream() -> AsyncIterator[bytes]:
        yield body

    form = await MultiPartParser(request.headers, stream(), max_part_size=limit).parse()
    files = []
    for _, value in form.multi_items():
        if hasattr(value, "read"):  # an UploadFile; plain text fields are ignored
            files.append((value.filename or "file", await value.read()))
    return files


class _Service:
    """The state and the handlers of one served ``predictor``."""

    def __init__(self, predictor: Predictor, options: ServeOptions, run_name: str) -> None:
        self.predictor, self.options, self.run_name = predictor, options, run_name
        self.metrics = _Metrics()
        self.batcher = Batcher(
            predictor,
            max_batch=options.max_batch,
            max_wait_ms=options.max_wait_ms,
            max_queue=options.max_queue,
            on_batch=self.metrics.on_batch,
            embed=_embedder(predictor),
            on_queue=self.metrics.queue_depth.set,  # the gauge's one owner
        )
        self.batcher.run["explain"] = overlay_runner(predictor, self.batcher.probabilities)
        self.decode_pool = ThreadPoolExecutor(
            options.decode_threads, thread_name_prefix="resfit-decode"
        )
        self.limit = int(options.max_body_mb * 1024 * 1024)
        self.ready = False
        self.has_embed = self.batcher.run["embed"] is not None

    @asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        self.batcher.start()
        # Warm up (allocations, autotuning) before /readyz says yes.
        size = self.predictor.base_size
        dummy = torch.zeros(3, size, size, dtype=torch.uint8)
        await asyncio.get_running_loop().run_in_executor(None, self.batcher.probabilities, [dummy])
        self.ready = True
        yield
        # uvicorn calls this after the in-flight requests are answered (graceful shutdown).
        self.ready = False
        await self.batcher.stop()
        self.decode_pool.shutdown(wait=True)

    async def guard(self, request: Request, call_next):  # token, metrics
        start = time.perf_counter()
        path = request.url.path
        token = self.options.token
        if token and path not in _OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                response = _error(
                    401, "missing or wrong token: send 'Authorization: Bearer TOKEN'",
                    **{"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
            else:
                response = await _answer(call_next, request)
        else:
            response = await _answer(call_next, request)
        known = path if path in _KNOWN_PATHS else "other"
        self.metrics.requests.labels(known, str(response.status_code)).inc()
        self.metrics.latency.labels(known).observe(time.perf_counter() - start)
        return response

    async def _files(self, request: Request) -> list[tuple[str, bytes]] | JSONResponse:
        try:
            body = await _read_body(request, self.limit)
        except _TooLarge:
            mb = self.options.max_body_mb
            return _error(413, f"body over the --max-body-mb limit of {mb:g} MB")
        if not _is_multipart(request):
            return [("body", body)]
        try:
            files = await _multipart_files(request, body, self.limit)
        except Exception as e:  # starlette's MultiPartException and parser errors
            return _error(400, f"bad multipart form: {e}")
        if not files:
            return _error(400, "the multipart form holds no file")
        o = self.options
        for limit, name in ((o.max_images, "--max-images"), (o.max_queue, "--max-queue")):
            if len(files) > limit:  # refused before anything is decoded or queued
                return _error(413, f"{len(files)} images in one request: over the {name} "
                                   f"limit of {limit} images per request")  # fmt: skip
        return files

    async def _each(self, files: list[tuple[str, bytes]], fn, *args) -> list | JSONResponse:
        """``fn(data, *args)`` for every file in the decode threads, or the 4xx of the first
        bad file (:func:`~.batching.decode_each`: the others are cancelled)."""
        try:
            return await decode_each(self.decode_pool, files, fn, *args)
        except BadImage as e:
            return _error(e.status, e.reason)

    async def images_of(self, request: Request) -> list[tuple[str, object]] | JSONResponse:
        """(name, decoded tensor) per image of the request, or the error response. Every
        image's size is checked from its header (each, then all together) before any decoding."""
        files = await self._files(request)
        if isinstance(files, JSONResponse):
            return files
        o = self.options
        pixels = await self._each(files, image_pixels, o.max_pixels)
        if isinstance(pixels, JSONResponse):
            return pixels
        if sum(pixels) > o.max_request_pixels:
            return _error(413, f"{sum(pixels):,} pixels in one request: over the "
                               f"--max-request-pixels limit of {o.max_request_pixels:,}")  # fmt: skip
        base = self.predictor.base_size
        decoded = await self._each(
            files, decode_image_bytes, base, o.max_pixels, self.predictor.window
        )
        if isinstance(decoded, JSONResponse):
            return decoded
        return [(name, img) for (name, _), img in zip(files, decoded, strict=True)]

    async def _queued(self, images: list, kind: str) -> list | JSONResponse:
        """The batcher's results for the decoded ``images``, or 503 when the queue is full."""
        try:
            return await self.batcher.submit_many([img for _, img in images], kind)
        except QueueFull as e:  # nothing was queued: the gauge (the batcher's) is unchanged
            return _error(503, f"server busy: {e}; retry shortly", **{"Retry-After": "1"})

    async def predict(self, request: Request, top_k: int | None = None) -> Response:
        if top_k is None:  # plain Starlette: FastAPI has checked and passed it already
            raw = request.query_params.get("top_k", "5")
            if not _TOP_K.fullmatch(raw) or int(raw) < 1:  # ASCII digits only: not '²'
                return _error(422, f"top_k={raw!r}: give a whole number of at least 1")
            top_k = int(raw)
        images = await self.images_of(request)
        if isinstance(images, JSONResponse):
            return images
        classes = self.predictor.classes
        k = min(top_k, len(classes))
        probs = await self._queued(images, "probabilities")
        if isinstance(probs, JSONResponse):
            return probs
        answers = [self.predictor.answer_row(p, k) for p in probs]  # the task's JSON + trust
        return _per_file(request, images, answers)

    async def explain(self, request: Request) -> Response:
        try:  # checked before any decoding
            idx = class_index(self.predictor.classes, request.query_params.get("class"))
        except ValueError as e:
            return _error(422, str(e))
        images = await self.images_of(request)
        if isinstance(images, JSONResponse):
            return images
        out = await self._queued([(n, (img, idx)) for n, img in images], "explain")
        if isinstance(out, JSONResponse):
            return out
        answers = [{"class": c, "overlay": data_url(png)} for c, png in out]
        return _per_file(request, images, answers)

    async def embed(self, request: Request) -> Response:
        if not self.has_embed:
            return _error(
                501,
                "embeddings are not part of this resfit version (no resfit.inference.embed module)",
            )
        images = await self.images_of(request)
        if isinstance(images, JSONResponse):
            return images
        vectors = await self._queued(images, "embed")
        if isinstance(vectors, JSONResponse):
            return vectors
        return _per_file(request, images, [{"embedding": v.tolist()} for v in vectors])

    async def predict_video(self, request: Request) -> Response:
        from .video import predict_video  # PyAV and its decoding: only when a clip comes

        result = await predict_video(self, request)
        if isinstance(result, Response):
            return result
        return JSONResponse(result[1], status_code=result[0])

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if not self.ready:
            return _error(503, "not ready: the model is loading or the server is stopping")
        engine = self.predictor.engine.describe()
        # The pid tells replicas and --workers processes apart (which one answered).
        ready = {"status": "ready", "engine": engine, "run": self.run_name, "pid": os.getpid()}
        return JSONResponse(ready)

    async def prometheus(self, request: Request) -> Response:
        # The queue-depth gauge has one owner, the batcher: set whenever its queue changes.
        return Response(self.metrics.scrape(), media_type=CONTENT_TYPE_LATEST)


_TOP_K = re.compile(r"[0-9]{1,6}")


async def _answer(call_next, request: Request) -> Response:
    """The app's response; an exception in a handler becomes a JSON 500 here, so that the
    metrics middleware sees and counts it like any other answer."""
    try:
        return await call_next(request)
    except Exception:
        log.exception("resfit serve: %s %s failed", request.method, request.url.path)
        return _error(500, "internal server error (logged by the server)")


def _embedder(predictor: Predictor):
    """The batcher's embed function (decoded images -> (N, D) L2-normalised features), or None
    without :mod:`resfit.inference.embed`."""
    if importlib.util.find_spec("resfit.inference.embed") is None:
        return None
    from ...inference.embed import embed_batch

    def embed(images: list) -> torch.Tensor:
        x = torch.stack([predictor.transform(img) for img in images])
        return embed_batch(predictor.model, x.to(predictor.device)).cpu()

    return embed


def _per_file(request: Request, images: list, answers: list[dict]) -> JSONResponse:
    """One answer for a raw body; for multipart files, a list with each file's name."""
    if _is_multipart(request):
        names = [name for name, _ in images]
        return JSONResponse([{"file": n, **a} for n, a in zip(names, answers, strict=True)])
    return JSONResponse(answers[0])


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


def create_app(
    predictor: Predictor,
    options: ServeOptions,
    *,
    run_name: str = "",
    framework: str = "starlette",
) -> object:
    """The ASGI app serving one loaded ``predictor``; the model is warmed up at startup.

    ``framework``: ``"starlette"`` (requests go through Starlette alone; ``/docs`` and
    ``/openapi.json`` are served from a schema FastAPI builds once) or ``"fastapi"`` (every
    request through FastAPI); both run the same handlers, batcher and metrics.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    service = _Service(predictor, options, run_name)
    build = _fastapi_app if framework == "fastapi" else _starlette_app
    return build(service, run_name)


_ROUTES = (  # path, method, handler name, summary (for the OpenAPI docs)
    ("/v1/embed", "POST", "embed", "L2-normalised pooled features of one or several images"),
    (
        "/v1/explain",
        "POST",
        "explain",
        "Grad-CAM overlays (PNG data URLs) of one image or several; ?class=NAME, default the "
        "predicted class",
    ),
    ("/v1/predict-video", "POST", "predict_video", "Classify a short clip's frames; its events"),
    ("/healthz", "GET", "healthz", "The process is alive"),
    ("/readyz", "GET", "readyz", "The model is loaded and warmed up"),
    ("/metrics", "GET", "prometheus", "Prometheus metrics"),
)
_PREDICT_SUMMARY = "Classify one image (raw body) or several (multipart files)"


def _fastapi_app(service: _Service, run_name: str) -> object:
    from fastapi import FastAPI, Query

    app = FastAPI(
        title="resfit serve",
        summary=f"Image classification with the resfit run {run_name}".strip(),
        lifespan=service.lifespan,
    )
    app.middleware("http")(service.guard)

    async def predict(request: Request, top_k: int = Query(5, ge=1)) -> Response:
        return await service.predict(request, top_k)

    app.post("/v1/predict", summary=_PREDICT_SUMMARY)(predict)
    for path, method, name, summary in _ROUTES:
        app.add_api_route(path, getattr(service, name), methods=[method], summary=summary)
    app.add_api_route("/", index, methods=["GET"], include_in_schema=False)  # the page
    return app


def _starlette_app(service: _Service, run_name: str) -> object:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.routing import Route

    routes = [Route("/v1/predict", service.predict, methods=["POST"])]
    routes += [Route(path, getattr(service, name), methods=[m]) for path, m, name, _ in _ROUTES]
    routes.append(Route("/", index, methods=["GET"]))  # the page
    routes += _docs_routes(service, run_name)
    return Starlette(
        routes=routes,
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=service.guard)],
        lifespan=service.lifespan,
    )


def _docs_routes(service: _Service, run_name: str) -> list:
    """``/openapi.json`` and ``/docs`` for the Starlette app: FastAPI writes the schema of the
    same routes once, so the docs cost nothing per request."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.routing import Route

    schema = _fastapi_app(service, run_name).openapi()

    async def openapi(request: Request) -> Response:
        return JSONResponse(schema)

    async def docs(request: Request) -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="resfit serve")

    return [Route("/openapi.json", openapi), Route("/docs", docs)]

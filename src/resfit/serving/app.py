"""The ASGI application of ``resfit serve``: routes, limits, token check and metrics.

Built on FastAPI (Starlette) so that OpenAPI docs (``/docs``, ``/openapi.json``) come for free;
uvicorn runs it (:mod:`resfit.serve`). Each process has its own Prometheus registry, so a test
or a second app in the same process counts apart.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.formparsers import MultiPartParser

from ..inference import Predictor
from .batching import BadImage, Batcher, QueueFull, decode_image_bytes

__all__ = ["ServeOptions", "create_app"]

_OPEN_PATHS = ()  # every path needs the token when one is set: the issue asks for each request


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_body_mb: float = 20.0
    token: str | None = None
    decode_threads: int = 4


class _Metrics:
    def __init__(self) -> None:
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
        self.queue_depth = Gauge("resfit_queue_depth", "Images waiting for the model", registry=r)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)


def _error(status: int, reason: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers or None)


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes ``limit`` bytes (chunked uploads too)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
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


def create_app(predictor: Predictor, options: ServeOptions, *, run_name: str = "") -> FastAPI:
    """The service for one loaded ``predictor``; the model is warmed up at startup."""
    metrics = _Metrics()
    batcher = Batcher(
        predictor,
        max_batch=options.max_batch,
        max_wait_ms=options.max_wait_ms,
        max_queue=options.max_queue,
        on_batch=metrics.on_batch,
    )
    decode_pool = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="resfit-decode")
    limit = int(options.max_body_mb * 1024 * 1024)
    state = {"ready": False}
    has_embed = importlib.util.find_spec("resfit.embed") is not None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        # Warm up (allocations, autotuning) before /readyz says yes.
        size = predictor.base_size
        dummy = torch.zeros(3, size, size, dtype=torch.uint8)
        await asyncio.get_running_loop().run_in_executor(None, batcher.probabilities, [dummy])
        state["ready"] = True
        yield
        # uvicorn calls this after the in-flight requests are answered (graceful shutdown).
        state["ready"] = False
        await batcher.stop()
        decode_pool.shutdown(wait=True)

    app = FastAPI(
        title="resfit serve",
        summary=f"Image classification with the resfit run {run_name}".strip(),
        lifespan=lifespan,
    )

    @app.middleware("http")
    async def guard(request: Request, call_next):  # token, metrics
        start = time.perf_counter()
        path = request.url.path
        if options.token and path not in _OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {options.token}".encode()):
                response = _error(
                    401, "missing or wrong token: send 'Authorization: Bearer TOKEN'",
                    **{"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
            else:
                response = await call_next(request)
        else:
            response = await call_next(request)
        known = path if path in ("/v1/predict", "/v1/embed", "/healthz", "/readyz") else "other"
        metrics.requests.labels(known, str(response.status_code)).inc()
        metrics.latency.labels(known).observe(time.perf_counter() - start)
        return response

    async def images_of(request: Request) -> list[tuple[str, object]] | JSONResponse:
        """(name, decoded tensor) per image of the request, or the error response."""
        try:
            body = await _read_body(request, limit)
        except _TooLarge:
            return _error(413, f"body over the --max-body-mb limit of {options.max_body_mb:g} MB")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            try:
                files = await _multipart_files(request, body, limit)
            except Exception as e:  # starlette's MultiPartException and parser errors
                return _error(400, f"bad multipart form: {e}")
            if not files:
                return _error(400, "the multipart form holds no file")
        else:
            files = [("body", body)]
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(decode_pool, decode_image_bytes, data, predictor.base_size)
            for _, data in files
        ]
        out = []
        for (name, _), job in zip(files, jobs, strict=True):
            try:
                out.append((name, await job))
            except BadImage as e:
                prefix = f"{name}: " if len(files) > 1 or name != "body" else ""
                return _error(e.status, prefix + e.reason)
        return out

    @app.post("/v1/predict", summary="Classify one image (raw body) or several (multipart files)")
    async def predict(request: Request, top_k: int = Query(5, ge=1)):
        images = await images_of(request)
        if isinstance(images, JSONResponse):
            return images
        k = min(top_k, len(predictor.classes))
        try:
            probs = await asyncio.gather(*(batcher.submit(img) for _, img in images))
        except QueueFull as e:
            return _error(503, f"server busy: {e}; retry shortly", **{"Retry-After": "1"})
        finally:
            metrics.queue_depth.set(batcher.pending)
        answers = []
        for p in probs:
            conf, idx = p.topk(k)
            top = [[predictor.classes[int(i)], float(c)] for c, i in zip(conf, idx, strict=True)]
            answers.append({"label": top[0][0], "confidence": top[0][1], "top_k": top})
        multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
        if multipart:
            return [{"file": name, **a} for (name, _), a in zip(images, answers, strict=True)]
        return answers[0]

    @app.post("/v1/embed", summary="L2-normalised pooled features of one or several images")
    async def embed(request: Request):
        if not has_embed:
            return _error(
                501, "embeddings are not part of this resfit version (no resfit.embed module)"
            )
        from ..embed import embed_batch  # the embeddings module, when installed

        images = await images_of(request)
        if isinstance(images, JSONResponse):
            return images

        def run() -> list[list[float]]:
            x = torch.stack([predictor.transform(img) for _, img in images])
            return embed_batch(predictor.model, x.to(predictor.device)).tolist()

        vectors = await asyncio.get_running_loop().run_in_executor(batcher._model_thread, run)
        multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
        if multipart:
            return [{"file": n, "embedding": v} for (n, _), v in zip(images, vectors, strict=True)]
        return {"embedding": vectors[0]}

    @app.get("/healthz", summary="The process is alive")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="The model is loaded and warmed up")
    async def readyz():
        if not state["ready"]:
            return _error(503, "not ready: the model is loading or the server is stopping")
        return {"status": "ready", "engine": predictor.engine.describe(), "run": run_name}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        metrics.queue_depth.set(batcher.pending)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app

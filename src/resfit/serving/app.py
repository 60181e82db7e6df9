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
        )
        self.decode_pool = ThreadPoolExecutor(
            options.decode_threads, thread_name_prefix="resfit-decode"
        )
        self.limit = int(options.max_body_mb * 1024 * 1024)
        self.ready = False
        self.has_embed = importlib.util.find_spec("resfit.embed") is not None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
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
                response = await call_next(request)
        else:
            response = await call_next(request)
        known = path if path in ("/v1/predict", "/v1/embed", "/healthz", "/readyz") else "other"
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
        return files or _error(400, "the multipart form holds no file")

    async def images_of(self, request: Request) -> list[tuple[str, object]] | JSONResponse:
        """(name, decoded tensor) per image of the request, or the error response."""
        files = await self._files(request)
        if isinstance(files, JSONResponse):
            return files
        loop = asyncio.get_running_loop()
        base = self.predictor.base_size
        jobs = [
            loop.run_in_executor(self.decode_pool, decode_image_bytes, data, base)
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

    async def predict(self, request: Request, top_k: int = Query(5, ge=1)):
        images = await self.images_of(request)
        if isinstance(images, JSONResponse):
            return images
        classes = self.predictor.classes
        k = min(top_k, len(classes))
        try:
            probs = await asyncio.gather(*(self.batcher.submit(img) for _, img in images))
        except QueueFull as e:
            return _error(503, f"server busy: {e}; retry shortly", **{"Retry-After": "1"})
        finally:
            self.metrics.queue_depth.set(self.batcher.pending)
        answers = []
        for p in probs:
            if getattr(self.predictor, "multilabel", False):  # {"labels", "probabilities"}
                answers.append(self.predictor.answer(p))
                continue
            conf, idx = p.topk(k)
            top = [[classes[int(i)], float(c)] for c, i in zip(conf, idx, strict=True)]
            answers.append({"label": top[0][0], "confidence": top[0][1], "top_k": top})
        if _is_multipart(request):
            return [{"file": name, **a} for (name, _), a in zip(images, answers, strict=True)]
        return answers[0]

    async def embed(self, request: Request):
        if not self.has_embed:
            return _error(
                501, "embeddings are not part of this resfit version (no resfit.embed module)"
            )
        from ..embed import embed_batch  # the embeddings module, when installed

        images = await self.images_of(request)
        if isinstance(images, JSONResponse):
            return images
        p = self.predictor

        def run() -> list[list[float]]:
            x = torch.stack([p.transform(img) for _, img in images])
            return embed_batch(p.model, x.to(p.device)).tolist()

        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self.batcher._model_thread, run)
        if _is_multipart(request):
            return [{"file": n, "embedding": v} for (n, _), v in zip(images, vectors, strict=True)]
        return {"embedding": vectors[0]}

    async def healthz(self):
        return {"status": "ok"}

    async def readyz(self):
        if not self.ready:
            return _error(503, "not ready: the model is loading or the server is stopping")
        return {"status": "ready", "engine": self.predictor.engine.describe(), "run": self.run_name}

    async def prometheus(self):
        self.metrics.queue_depth.set(self.batcher.pending)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


def create_app(predictor: Predictor, options: ServeOptions, *, run_name: str = "") -> FastAPI:
    """The service for one loaded ``predictor``; the model is warmed up at startup."""
    service = _Service(predictor, options, run_name)
    app = FastAPI(
        title="resfit serve",
        summary=f"Image classification with the resfit run {run_name}".strip(),
        lifespan=service.lifespan,
    )
    app.middleware("http")(service.guard)
    app.post("/v1/predict", summary="Classify one image (raw body) or several (multipart files)")(
        service.predict
    )
    app.post("/v1/embed", summary="L2-normalised pooled features of one or several images")(
        service.embed
    )
    app.get("/healthz", summary="The process is alive")(service.healthz)
    app.get("/readyz", summary="The model is loaded and warmed up")(service.readyz)
    app.get("/metrics", summary="Prometheus metrics")(service.prometheus)
    return app

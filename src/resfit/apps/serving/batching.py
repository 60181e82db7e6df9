"""Dynamic batching for the HTTP service: requests that arrive together share one forward pass.

A request's image is decoded (in a thread pool, off the event loop) to the run's decode size,
then handed to :class:`Batcher`, which groups what is waiting, up to ``max_batch`` images or
``max_wait_ms`` after the first one, and runs the group through the :class:`Predictor` on its
single model thread. While one batch runs the next one gathers, so under load the batches fill
up and the per-image cost of the forward pass falls.

The bound on waiting work (``max_queue``) counts every image that has been handed over and has
not started its forward pass; past it, :meth:`Batcher.submit` raises :class:`QueueFull` and the
server answers 503 with Retry-After instead of letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import io
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from ...core.windows import Window
from ...data.datasets import DecodedImages
from ...data.decode import (
    MAX_PIXELS,
    DecodeError,
    load_image,
    pil_to_rgb,
    resize_shorter,
    to_tensor,
)
from ...data.dicom import dicom_pixels, is_dicom
from ...inference.predictor import Predictor

__all__ = ["BadImage", "Batcher", "QueueFull", "decode_each", "decode_image_bytes", "image_pixels"]


class BadImage(Exception):
    """A request body that is not a usable image; ``status`` is the HTTP code to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class QueueFull(Exception):
    """More images are waiting for the model than the server's ``max_queue``."""


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header only (PIL reads no pixels until ``load()``), its size checked
    against the server's ``max_pixels`` before anything is decoded, whatever the format."""
    if not data:
        raise BadImage(400, "empty body: send the image's bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage(415, "not an image (no known image format)") from None
    if img.width * img.height > max_pixels:
        img.close()
        raise BadImage(
            413,
            f"{img.width}x{img.height} pixels is over the --max-pixels limit of "
            f"{max_pixels:,} pixels per image",
        )
    return img


def image_pixels(data: bytes, max_pixels: int = MAX_PIXELS) -> int:
    """Width x height from the image's header, without decoding it; :class:`BadImage` as
    :func:`decode_image_bytes` for an empty body, an unknown format or too many pixels."""
    if is_dicom(Path("body"), data):
        return _dicom_pixels(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open(data, max_pixels) as img:
                return img.width * img.height
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(413, f"decompression bomb guard: {e}") from None
    except Exception as e:  # a header PIL recognises but cannot parse
        raise BadImage(422, f"broken image: {_reason(e)}") from None


def _dicom_pixels(data: bytes, max_pixels: int) -> int:
    try:
        n = dicom_pixels(data)
    except ImportError as e:
        raise BadImage(415, str(e)) from None
    except Exception as e:  # pydicom's errors for a broken header
        raise BadImage(422, f"broken DICOM header: {_reason(e)}") from None
    if n > max_pixels:
        raise BadImage(413, f"{n:,} pixels is over the --max-pixels limit of {max_pixels:,}")
    return n


def _reason(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def decode_image_bytes(
    data: bytes, base_size: int, max_pixels: int = MAX_PIXELS, window: Window = None
) -> Tensor:
    """An image body as a uint8 (3, H, W) tensor, decoded exactly as ``resfit predict`` decodes
    a file (:func:`resfit.data.decode.load_image` then the shorter side resized to ``base_size``), so
    the server and offline prediction give the same labels.

    ``max_pixels`` is checked from the header, before decoding. Raises :class:`BadImage`: 400
    empty, 415 not an image, 413 over ``max_pixels`` (or PIL's bomb guard), 422 broken.
    A DICOM body (its ``DICM`` preamble) decodes as a ``.dcm`` file does, and a 16-bit one, at
    ``window`` (the run's: the predictor's ``window``).
    """
    if is_dicom(Path("body"), data):
        _dicom_pixels(data, max_pixels)
        try:
            return to_tensor(
                resize_shorter(load_image("body.dcm", data=data, window=window), base_size)
            )
        except DecodeError as e:
            raise BadImage(422, f"broken DICOM: {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours is the limit
            with _open(data, max_pixels) as img:
                if img.format == "JPEG":  # decode at reduced size in the DCT domain, as predict
                    img.draft("RGB", (base_size * 2, base_size * 2))
                img.seek(0)  # first frame of an animation
                img = ImageOps.exif_transpose(img)
                img.load()
                rgb = pil_to_rgb(img, window)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(413, f"decompression bomb guard: {e}") from None
    except Exception as e:  # PIL raises many types for truncated or corrupt data
        raise BadImage(422, f"broken image: {_reason(e)}") from None
    return to_tensor(resize_shorter(rgb, base_size))


async def decode_each(pool: Executor, files: list[tuple[str, bytes]], fn, *args) -> list:
    """``fn(data, *args)`` for every ``(name, data)`` of ``files`` in ``pool``, in order.
    After one job fails the jobs that have not started are cancelled (a bad file never costs
    the decoding of the others) and the first failure in file order is raised: a
    :class:`BadImage` with the file's name in front of its reason (a raw body's: none)."""
    loop = asyncio.get_running_loop()
    jobs = [loop.run_in_executor(pool, fn, data, *args) for _, data in files]
    try:
        await asyncio.wait(jobs, return_when=asyncio.FIRST_EXCEPTION)
    finally:  # also when the client has gone (this task cancelled)
        for job in jobs:
            job.cancel()  # a no-op for the finished ones
        # Every job's outcome retrieved (no "exception never retrieved"); a cancelled one
        # answers at once, its thread's result (if it had started) is dropped.
        out = await asyncio.gather(*jobs, return_exceptions=True)
    for (name, _), result in zip(files, out, strict=True):
        if isinstance(result, asyncio.CancelledError):
            continue  # cancelled after another file failed: that one is raised
        if isinstance(result, BadImage):
            prefix = f"{name}: " if len(files) > 1 or name != "body" else ""
            raise BadImage(result.status, prefix + result.reason)
        if isinstance(result, BaseException):
            raise result
    return out


@dataclass
class _Item:
    image: Tensor | tuple  # explain: (image, class index or None)
    future: asyncio.Future
    kind: str = "probabilities"  # or "embed", "explain"


class Batcher:
    """Groups decoded images into batches for ``predictor`` and answers each with its
    probabilities (calibrated: the run's temperature is applied).

    ``on_batch(size, seconds)`` is called after every forward pass and ``on_queue(pending)``
    when the queue grows or shrinks (for metrics; in every worker, scraped or not). ``embed``
    (decoded images -> (N, D) tensor) serves :meth:`submit_many` with ``kind="embed"``: the
    embeddings share the queue, its limit and the batching with the predictions.
    ``run["explain"]``, set by the app ((image, class index) pairs -> one result each), serves
    ``kind="explain"`` on the same model thread: Grad-CAM's backward pass never runs beside a
    forward pass of the service.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
        embed: Callable[[list[Tensor]], Tensor] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ) -> None:
        self.predictor = predictor
        self.max_batch = max(1, max_batch)
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.max_queue = max(1, max_queue)
        self.on_batch = on_batch
        self.on_queue = on_queue or (lambda pending: None)  # the queue depth when it changes
        self.run = {"probabilities": self.probabilities, "embed": embed, "explain": None}
        self.pending = 0  # images handed over that have not started their forward pass
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        # One model thread: the engine uses all of this process's cores for each batch.
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="resfit-model")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish: called after the server has answered its in-flight requests."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.model_thread.shutdown(wait=True)

    async def submit(self, image: Tensor) -> Tensor:
        """The probabilities (classes,) for one decoded image, once its batch has run."""
        return (await self.submit_many([image]))[0]

    async def submit_many(self, images: list, kind: str = "probabilities") -> list:
        """One result per image (probabilities, or embeddings with ``kind="embed"``, overlays
        with ``kind="explain"`` for (image, class index) pairs). All the
        images are queued or none: :class:`QueueFull` if they do not all fit, before any is."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        if self.pending + len(images) > self.max_queue:
            raise QueueFull(
                f"{self.pending} images are waiting for the model and the queue holds "
                f"{self.max_queue} (--max-queue)"
            )
        loop = asyncio.get_running_loop()
        items = [_Item(img, loop.create_future(), kind) for img in images]
        self.pending += len(items)
        for item in items:
            self._queue.put_nowait(item)
        self.on_queue(self.pending)
        return list(await asyncio.gather(*(it.future for it in items)))

    def probabilities(self, images: list[Tensor]) -> Tensor:
        """Probabilities (N, classes) of decoded images in one pass: Predictor's own path."""
        n = len(images)
        decoded = DecodedImages(
            images, torch.full((n,), -1), [Path("")] * n, [], self.predictor.base_size
        )
        # With the unknown score as a last column where the run has one (Predictor.answer_row).
        return self.predictor.scored_probabilities(decoded, batch_size=n)

    async def _gather(self) -> list[_Item]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                # Take what is already waiting (it arrived while the last batch ran).
                while len(batch) < self.max_batch and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._gather()
            self.pending -= len(batch)
            self.on_queue(self.pending)
            live = [it for it in batch if not it.future.done()]  # a client may have gone
            for kind in dict.fromkeys(it.kind for it in live):
                await self._run([it for it in live if it.kind == kind], kind)

    async def _run(self, items: list[_Item], kind: str) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            run = self.run[kind]
            if run is None:
                raise RuntimeError(f"this batcher has no {kind} function")
            out = await loop.run_in_executor(self.model_thread, run, [it.image for it in items])
        except Exception as e:  # a bug or a runtime failure: every waiter gets it
            for it in items:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        if self.on_batch is not None:
            self.on_batch(len(items), time.perf_counter() - start)
        for it, p in zip(items, out, strict=True):
            if not it.future.done():
                it.future.set_result(p)

"""``POST /v1/predict-video``: a short clip (the raw body) classified frame by frame, within the
limits that images have (the body's --max-body-mb; frames count as images for --max-images,
each frame's pixels against --max-pixels, all of them against --max-request-pixels), answered
with per-frame labels and the smoothed events of :mod:`resfit.inference.video`.

Query: ``fps`` (frames classified per second, default 2) and ``smooth`` (seconds, default 1).
"""

from __future__ import annotations

import asyncio
import io
import re

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from ...core.errors import DataError
from ...data.decode import resize_shorter, to_tensor
from ...data.video import read_frames
from ...inference.video import events, smooth

__all__ = ["predict_video"]

_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def _frames(data: bytes, fps: float, base: int, options) -> tuple[list[float], list]:
    """The clip's frames (times, uint8 tensors), refused past the limits as they come."""
    times, images, pixels = [], [], 0
    for t, img in read_frames(io.BytesIO(data), fps):
        if len(images) >= options.max_images:
            raise _Refused(413, f"more than {options.max_images} frames at fps={fps:g}: over "
                                f"the --max-images limit; send a shorter clip or a lower fps")  # fmt: skip
        n = img.width * img.height
        pixels += n
        if n > options.max_pixels or pixels > options.max_request_pixels:
            raise _Refused(413, f"the frames pass the --max-pixels/--max-request-pixels limits "
                                f"({img.width}x{img.height}, {pixels:,} pixels so far)")  # fmt: skip
        times.append(t)
        images.append(to_tensor(resize_shorter(img, base)))
    if not images:
        raise _Refused(400, "the video holds no frames")
    return times, images


def _query(request: Request, name: str, default: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not _NUMBER.fullmatch(raw) or float(raw) <= 0 and name == "fps":
        raise _Refused(
            422, f"{name}={raw!r}: give a number" + (" above 0" if name == "fps" else "")
        )
    return float(raw)


async def predict_video(service, request: Request) -> Response | tuple[int, dict]:
    """The handler's work (``service``: the app's ``_Service``): (status, JSON body), or the
    response that reading or queueing answered already."""
    try:
        fps, seconds = _query(request, "fps", 2.0), _query(request, "smooth", 1.0)
        files = await service._files(request)
        if isinstance(files, Response):
            return files
        loop = asyncio.get_running_loop()
        base = service.predictor.base_size
        times, images = await loop.run_in_executor(
            service.decode_pool, _frames, files[0][1], fps, base, service.options
        )
    except _Refused as e:
        return e.status, {"error": e.reason}
    except DataError as e:
        return 400, {"error": str(e)}
    probs = await service._queued([("frame", x) for x in images], "probabilities")
    if isinstance(probs, Response):
        return probs
    classes = service.predictor.classes
    # A run with an unknown score answers it as one more column: frames keep the classes'.
    p = np.stack([np.asarray(x, dtype=np.float64)[: len(classes)] for x in probs])
    t = np.asarray(times)
    labels = smooth(t, p, seconds)
    frames = [{"time": round(float(ti), 3), "label": classes[int(pi.argmax())],
               "confidence": float(pi.max()), "smoothed_label": classes[s]}
              for ti, pi, s in zip(t, p, labels, strict=True)]  # fmt: skip
    return 200, {"frames": frames, "events": events(t, p, labels, classes)}

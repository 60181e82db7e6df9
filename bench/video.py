"""Video decoding beside the model: frames per second that PyAV decodes (single-threaded, the
baseline, and with frame threads, the candidate) against the frames per second a
ResNet-18 classifies at 224 px, on one H.264 clip (640x360, 30 fps, 10 s, written here with
PyAV from flowers5-256 photos panned across the frame, CRF 23).

torchvision's video reader was the other candidate: torchvision 0.29 (pinned here) no longer has
one (``torchvision.io`` exposes no ``read_video``/``VideoReader``; video moved to TorchCodec), so
PyAV is what resfit decodes with.

Machine: 2-core AMD EPYC Zen 4 (AVX512_BF16), shared, under /work/cpu.lock.
Last figures (2026-12-06):
  PyAV decode, 1 thread (baseline):  1084.4 frames/s
  PyAV decode, frame threads       :   943.0 frames/s  ratio 0.87x (2 shared cores: no gain)
  ResNet-18 at 224 px, batch 32    :    34.0 frames/s  (decoding 28x faster than the model)
So resfit.data.video keeps PyAV's default threading; the model, not decoding, sets the pace.
Run: flock /work/cpu.lock /work/main/.venv/bin/python bench/video.py
"""

from __future__ import annotations

import sys
import tempfile
import time
import zipfile
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
FLOWERS = ROOT.parent / "shared" / "assets" / "datasets" / "flowers5-256.zip"


def write_clip(path: Path, seconds: int = 10, fps: int = 30) -> Path:
    """A 640x360 H.264 clip of flowers5 photos, each panned for a second."""
    with zipfile.ZipFile(FLOWERS) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))[:seconds]
        photos = [Image.open(z.open(n)).convert("RGB").resize((960, 540)) for n in names]
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 640, 360, "yuv420p"
        for i in range(seconds * fps):
            photo, k = photos[i // fps], i % fps
            frame = photo.crop((k * 10, k * 5, k * 10 + 640, k * 5 + 360))
            for p in s.encode(av.VideoFrame.from_image(frame)):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def decode_fps(path: Path, threads: bool) -> float:
    start, n = time.perf_counter(), 0
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        if threads:
            stream.thread_type = "AUTO"
        for frame in c.decode(stream):
            frame.to_image()
            n += 1
    return n / (time.perf_counter() - start)


def model_fps(batch: int = 32) -> float:
    from resfit.models.weights import create_model

    model = create_model("resnet18", num_classes=5).eval()
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(3):
            model(x)
    return 3 * batch / (time.perf_counter() - start)


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip(Path(tmp) / "clip.mp4")
        base = np.median([decode_fps(clip, threads=False) for _ in range(3)])
        ours = np.median([decode_fps(clip, threads=True) for _ in range(3)])
    net = model_fps()
    print(f"PyAV decode, 1 thread (baseline): {base:7.1f} frames/s")
    print(f"PyAV decode, frame threads (ours): {ours:7.1f} frames/s  ratio {ours / base:.2f}x")
    print(
        f"ResNet-18 at 224 px, batch 32     : {net:7.1f} frames/s  (decode/model {ours / net:.1f}x)"
    )


if __name__ == "__main__":
    main()

"""Which ASGI stack for resfit serve: FastAPI vs plain Starlette on uvicorn (and LitServe).

    python bench/asgi_stack.py RUN IMAGES [--requests 1000] [--clients 16] [--rounds 2]

Every variant serves the same :mod:`resfit.apps.serving` handlers, batcher (32 images, 5 ms) and
engine; only the framework around them changes:

- ``fastapi``: ``create_app(framework="fastapi")`` on uvicorn (asyncio loop, h11): today's;
- ``starlette``: ``create_app(framework="starlette")``: the same routes without FastAPI;
- ``fastapi+uvloop``: as ``fastapi`` with uvicorn's uvloop loop and httptools parser, where
  ``--uvloop DIR`` holds them (``pip install --target DIR uvloop httptools``);
- ``litserve``: LitServe 0.2.19 (``--litserve DIR``, ``pip install --no-deps --target DIR
  litserve pyzmq``) with a LitAPI around the same decode and ``Batcher.probabilities``, its own
  batching (``max_batch_size=32, batch_timeout=0.005``) and inference worker process. Its
  requests are JSON with the image in base64 (LitServe reads a JSON or form body).

Two workloads, each from ``--clients`` concurrent keep-alive clients (a minimal asyncio
HTTP/1.1 client, so the load generator costs little next to the server on the same cores):
the RUN's model on real photos (images/s, p50/p99 latency), and a no-op model (zeros as
logits) on an 8x8 PNG, where only the framework, decoding and the batcher cost (requests/s).
Each variant runs ``--rounds`` times, interleaved; the figure is the mean, +-half the spread.

Last figures (2 cores of an AMD EPYC Zen 4 with avx512_bf16, no AMX; torch engine, bf16 by
`auto`; server with RESFIT_THREADS=2 and the load generator on the same 2 cores; 2026-11-29;
CIFAR ResNet-56 at 32 px fine-tuned on flowers5, 736 val photos; 1000 model requests and 2000
no-op requests per run, 16 clients, 3 rounds; mean +-half the spread):
  offline predict (same engine): 834 img/s
  fastapi         model: 354 +-33 img/s (0.42x offline), p50 41 ms, p99 254 ms
                  no-op: 707 +-36 req/s, p50 20 ms, p99 41 ms
  starlette       model: 402 +-16 img/s (0.48x offline), p50 36 ms, p99 226 ms
                  no-op: 849 +-44 req/s, p50 17 ms, p99 34 ms
  fastapi+uvloop  model: 400 +-22 img/s (0.48x offline), p50 35 ms, p99 256 ms
                  no-op: 774 +-44 req/s, p50 19 ms, p99 39 ms
  litserve        model: 111 +-2 img/s (0.13x offline), p50 84 ms, p99 409 ms
                  no-op: 290 +-7 req/s, p50 53 ms, p99 68 ms
  Baseline FastAPI (what resfit served before); Starlette 1.20x its requests/s around the
  no-op model and 1.14x its images/s, every round (its worst no-op round, 791, beat FastAPI's
  best, 751). resfit serve now runs plain Starlette and keeps the docs (a schema FastAPI writes
  once). uvloop + httptools (``pip install 'uvicorn[standard]'``, which uvicorn then picks by
  itself) gave FastAPI 1.09x / 1.13x. LitServe moves every request to an inference worker
  process and back; on 2 shared cores that costs 0.41x of FastAPI's no-op rate.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("fastapi", "starlette", "fastapi+uvloop", "litserve")
SRC = Path(__file__).resolve().parents[1] / "src"


class NoOpPredictor:
    """Just what the service uses of a Predictor, with zeros for logits: what is left to
    measure is the framework, the decode and the batcher."""

    base_size = 8
    classes = ["a", "b"]

    class engine:  # noqa: N801 (an attribute that reads like Predictor.engine)
        @staticmethod
        def describe() -> str:
            return "no-op"

    def logits(self, decoded, batch_size: int):
        import torch

        return torch.zeros(len(decoded.images), 2)

    def probabilities(self, logits):
        return logits.softmax(1)


def _predictor(model: str):
    if model == "noop":
        return NoOpPredictor()
    from resfit.inference.predictor import Predictor

    return Predictor.from_run(model)


def _child(variant: str, model: str, port: int) -> None:
    """Serve ``model`` (a run folder or ``noop``) with ``variant`` on 127.0.0.1:``port``."""
    from resfit.core import threads

    threads.configure(None)
    if variant == "litserve":
        return _litserve_child(model, port)
    import uvicorn

    from resfit.apps.serving.app import ServeOptions, create_app

    app = create_app(_predictor(model), ServeOptions(), framework=variant.split("+")[0])
    fast = variant.endswith("+uvloop")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                loop="uvloop" if fast else "asyncio", http="httptools" if fast else "h11")  # fmt: skip


def _litserve_child(model: str, port: int) -> None:
    import litserve as ls

    api = _lit_api_class()(model, max_batch_size=32, batch_timeout=0.005)
    server = ls.LitServer(
        api, accelerator="cpu", devices=1, workers_per_device=1, timeout=120, fast_queue=True
    )  # ZeroMQ between the API server and the worker
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")


def _lit_api_class() -> type:
    """The LitAPI around resfit's decode and batch path. Defined once, at module level (as
    ``LitResfit``), because LitServe pickles it into a spawned inference worker."""
    global LitResfit
    if "LitResfit" in globals():
        return LitResfit
    import litserve as ls

    from resfit.apps.serving.batching import Batcher, decode_image_bytes

    class LitResfit(ls.LitAPI):
        def __init__(self, model: str, **kw) -> None:
            super().__init__(**kw)
            self.model = model

        def setup(self, device: str) -> None:
            from resfit.core import threads

            threads.configure(None)
            self.batcher = Batcher(_predictor(self.model))  # its probabilities(): the same path

        def decode_request(self, request):
            data = base64.b64decode(request["image"])
            return decode_image_bytes(data, self.batcher.predictor.base_size)

        def batch(self, inputs):
            return inputs  # a list of decoded images, as Batcher.probabilities takes them

        def predict(self, images):
            return self.batcher.probabilities(list(images))

        def unbatch(self, output):
            return list(output)

        def encode_response(self, p):
            classes = self.batcher.predictor.classes
            conf, idx = p.topk(min(5, len(classes)))
            top = [[classes[int(i)], float(c)] for c, i in zip(conf, idx, strict=True)]
            return {"label": top[0][0], "confidence": top[0][1], "top_k": top}

    LitResfit.__qualname__ = "LitResfit"
    return LitResfit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(path: str, body: bytes, content_type: str) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = dict(h.split(": ", 1) for h in head[1:] if ": " in h)
    headers = {k.lower(): v for k, v in headers.items()}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    body = b""  # chunked
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        body += (await reader.readexactly(size + 2))[:-2]
    await reader.readuntil(b"\r\n")
    return status, body


async def _load(port: int, requests: list[bytes], n: int, clients: int) -> list[float]:
    latencies: list[float] = []

    async def client(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for j in range(i, n, clients):
            t = time.perf_counter()
            writer.write(requests[j % len(requests)])
            status, body = await _read_response(reader)
            if status != 200:
                raise SystemExit(f"HTTP {status}: {body[:200]!r}")
            latencies.append(time.perf_counter() - t)
        writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies


def _wait_ready(proc: subprocess.Popen, port: int, path: str) -> None:
    import urllib.request

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)  # polling a starting server, not synchronising with it
    raise SystemExit("the server did not get ready in 180 s")


def measure(variant: str, model: str, bodies: list[bytes], n: int, clients: int,
            env: dict[str, str]) -> dict[str, float]:  # fmt: skip
    """Start ``variant`` serving ``model``, load it with ``n`` requests, stop it."""
    port = _free_port()
    argv = [sys.executable, __file__, "--child", variant, model, str(port)]
    # A session of its own: LitServe's worker processes are stopped with the server.
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    lit = variant == "litserve"
    if lit:
        reqs = [_request("/predict", json.dumps({"image": base64.b64encode(b).decode()}).encode(),
                         "application/json") for b in bodies]  # fmt: skip
    else:
        reqs = [_request("/v1/predict", b, "application/octet-stream") for b in bodies]
    try:
        _wait_ready(proc, port, "/health" if lit else "/readyz")
        asyncio.run(_load(port, reqs, 4 * clients, clients))  # warm-up
        start = time.perf_counter()
        lat = sorted(asyncio.run(_load(port, reqs, n, clients)))
        wall = time.perf_counter() - start
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # LitServe's workers outlive a SIGTERM
    return {"per_s": n / wall, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}  # fmt: skip


def _tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _offline(run: str, files: list[Path]) -> float:
    from resfit.inference.predictor import Predictor

    p = Predictor.from_run(run)
    p.predict(files[:64])  # warm-up
    start = time.perf_counter()
    p.predict(files)
    return len(files) / (time.perf_counter() - start)


def _summary(rs: list[dict[str, float]], unit: str) -> str:
    def mean_spread(key: str) -> str:
        vals = [r[key] for r in rs]
        return f"{statistics.mean(vals):.0f} +-{(max(vals) - min(vals)) / 2:.0f}"

    return (f"{mean_spread('per_s')} {unit}, p50 {mean_spread('p50_ms')} ms, "
            f"p99 {mean_spread('p99_ms')} ms")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("images")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--uvloop", default=None, help="folder holding uvloop and httptools")
    ap.add_argument("--litserve", default=None, help="folder holding litserve and pyzmq")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    exts = {".jpg", ".jpeg", ".png"}
    files = sorted(p for p in Path(a.images).rglob("*") if p.suffix.lower() in exts)
    photos, tiny = [p.read_bytes() for p in files], [_tiny_png()]
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    # The server gets both cores whatever else runs (the fair share would vary run to run).
    base_env = {**os.environ, "PYTHONPATH": path, "RESFIT_THREADS": str(os.cpu_count() or 1)}
    extra = {"fastapi+uvloop": a.uvloop, "litserve": a.litserve}
    variants = [v for v in a.variants.split(",") if v in VARIANTS]
    variants = [v for v in variants if v not in extra or extra[v]]
    offline = _offline(a.run, files)
    print(f"offline predict: {offline:.1f} img/s over {len(files)} photos", flush=True)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(a.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            env = dict(base_env)
            if extra.get(v):
                env["PYTHONPATH"] = os.pathsep.join([extra[v], env["PYTHONPATH"]])
            if v == "litserve":
                env["RESFIT_BENCH_LITSERVE"] = "1"
            for model, bodies, n in ((a.run, photos, a.requests), ("noop", tiny, 2 * a.requests)):
                res = measure(v, model, bodies, n, a.clients, env)
                results.setdefault((v, "model" if model != "noop" else "noop"), []).append(res)
                print(f"  round {r + 1} {v:15s} {'no-op' if model == 'noop' else 'model'}: "
                      f"{res['per_s']:.0f}/s p50 {res['p50_ms']:.0f} ms "
                      f"p99 {res['p99_ms']:.0f} ms", flush=True)  # fmt: skip
    for v in variants:
        m = results[(v, "model")]
        ratio = statistics.mean(x["per_s"] for x in m) / offline
        print(f"{v:15s} model: {_summary(m, 'img/s')} ({ratio:.2f}x offline)")
        print(f"{'':15s} no-op: {_summary(results[(v, 'noop')], 'req/s')}")


if __name__ in ("__main__", "__mp_main__") and os.environ.get("RESFIT_BENCH_LITSERVE"):
    _lit_api_class()  # LitServe's spawned worker unpickles __main__.LitResfit

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
    else:
        main()

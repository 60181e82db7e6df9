"""resfit serve under bad requests (issue 26): the decoding budget, request limits, JSON for any
class name, errors counted in /metrics, strict query parsing, and ``--workers`` signals."""

# ruff: noqa: F811  (the fixtures of tests/test_serve.py are imported, then named as arguments)

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def _old_pil_to_rgb(img: Image.Image) -> Image.Image:
    """The conversion before issue 26 (float64 and whole-image RGBA copies): the reference."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        peak = 65535 if arr.max() > 255 else 255
        return Image.fromarray(
            (arr.astype(np.float64) * (255 / peak)).round().astype(np.uint8)
        ).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo or 1.0) * 255
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    shape = (37, 53)
    full16 = rng.integers(0, 65536, shape, dtype=np.uint16)
    low16 = rng.integers(0, 256, shape, dtype=np.uint16)
    rgba = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
    palette = Image.fromarray(rgba[..., 0] // 16).convert("P")
    palette.info["transparency"] = 3
    every16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value
    return [
        Image.fromarray(full16),  # I;16
        Image.fromarray(low16),
        Image.fromarray(every16),
        Image.fromarray(full16.astype(np.int32)),  # mode I, as 16-bit PNGs often open
        Image.fromarray(rng.normal(0, 3, shape).astype(np.float32)),  # F
        Image.fromarray(rgba),  # RGBA
        Image.fromarray(rgba).convert("LA"),
        Image.fromarray(rgba).convert("PA"),
        palette,
        Image.fromarray(rgba[..., :3]),  # RGB: unchanged path
    ]


@pytest.mark.parametrize("strip", [1 << 20, 100])  # one strip, and many strips of two rows
def test_strip_conversion_is_bit_identical_to_the_whole_image_one(monkeypatch, strip) -> None:
    from resfit.data import decode

    monkeypatch.setattr(decode, "_STRIP_PIXELS", strip)
    for img in _odd_images():
        new, old = decode.pil_to_rgb(img), _old_pil_to_rgb(img)
        assert new.mode == "RGB" and new.size == old.size, img.mode
        assert np.array_equal(np.asarray(new), np.asarray(old)), img.mode


# ---------------------------------------------------------------------------------------------
# The service

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

import asyncio  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.images import colour_image  # noqa: E402
from tests.test_serve import Server, data_dir, images, run_dir  # noqa: E402, F401


def sixteen_bit_png(width: int, height: int, value: int = 40_000) -> bytes:
    """A grey 16-bit PNG of one value, written row by row: 9,000 x 9,000 is ~150 kB on disk
    and never whole in this process's memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" + struct.pack(">H", value) * width  # filter byte 0, then the samples
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (Linux VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _worker_pids(server: Server) -> list[int]:
    return [p.pid for p in psutil.Process(server.proc.pid).children()]


@pytest.fixture(scope="module")
def server(run_dir: Path):
    s = Server(run_dir, "--max-images", "4", "--max-pixels", "1000000", "--max-queue", "6",
               "--max-request-pixels", "3000000")  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def plain(run_dir: Path):
    """A server with the default limits."""
    s = Server(run_dir)
    yield s
    s.stop()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM (Linux)")
def test_a_16_bit_9000_square_png_is_refused_from_its_header(plain: Server) -> None:
    server = plain
    body = sixteen_bit_png(9000, 9000)
    assert len(body) < 400_000
    idle = psutil.Process(server.proc.pid).memory_info().rss
    peak_before = _peak_rss(server.proc.pid)
    r = server.client.post("/v1/predict", content=body)
    # Decoding it would take ~160 MB for PIL's 16-bit pixels alone (issue 26: 1.7 GB more).
    grown = _peak_rss(server.proc.pid) - peak_before
    assert grown < 0.25 * idle, f"peak RSS {grown / 2**20:.0f} MB over {idle / 2**20:.0f} MB idle"
    assert r.status_code == 413, r.text
    assert "--max-pixels limit of 40,000,000 pixels" in r.json()["error"]
    # Under the limit it is decoded, scaled (not clipped): the 16-bit grey is an answer.
    assert server.client.post("/v1/predict", content=sixteen_bit_png(900, 900)).is_success
    r = server.client.post("/v1/predict", content=sixteen_bit_png(9000, 9000, value=0))
    assert r.status_code == 413  # a second one (all zeros: ~40 kB) the same


def test_limits_per_request_are_named_and_nothing_is_computed(server: Server, images) -> None:
    def files(n: int, body: bytes) -> list:
        return [("files", (f"{i}.png", body, "image/png")) for i in range(n)]

    batches = server.metric("resfit_batch_size_count")
    body = images[0].read_bytes()
    r = server.client.post("/v1/predict", files=files(5, body))
    assert r.status_code == 413 and "--max-images limit of 4" in r.json()["error"], r.text
    big = sixteen_bit_png(900, 900)  # 810,000 pixels each, under --max-pixels
    r = server.client.post("/v1/predict", files=files(4, big))
    assert r.status_code == 413 and "--max-request-pixels limit of 3,000,000" in r.json()["error"]
    assert server.metric("resfit_batch_size_count") == batches  # none of it reached the model
    r = server.client.post("/v1/predict", files=files(4, body))
    assert r.status_code == 200 and len(r.json()) == 4


def test_a_request_larger_than_the_queue_is_413_at_once(run_dir: Path, images) -> None:
    s = Server(run_dir, "--max-queue", "2")
    try:
        batches = s.metric("resfit_batch_size_count")
        files = [("files", (f"{i}.png", images[0].read_bytes(), "image/png")) for i in range(3)]
        r = s.client.post("/v1/predict", files=files)
        assert r.status_code == 413 and "--max-queue limit of 2" in r.json()["error"], r.text
        assert s.metric("resfit_batch_size_count") == batches
    finally:
        s.stop()


def test_top_k_is_parsed_strictly(plain: Server, images) -> None:
    server = plain
    body = images[0].read_bytes()
    for raw in ("%C2%B2", "%D9%A3", "1e3", "+2", " 2", "9" * 5000, "-1", "0"):  # ², Arabic 3
        r = server.client.post(f"/v1/predict?top_k={raw}", content=body)
        assert r.status_code == 422 and "top_k" in r.json()["error"], (raw, r.text)
    assert server.client.post("/v1/predict?top_k=2", content=body).status_code == 200


def test_embed_shares_the_queue_and_answers_503_when_it_is_full(run_dir: Path, images) -> None:
    pytest.importorskip("resfit.inference.embed")
    s = Server(run_dir, "--max-wait-ms", "3000", "--max-batch", "64", "--max-queue", "2")
    try:
        body = images[0].read_bytes()

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                waiting = [asyncio.create_task(c.post(path, content=body))
                           for path in ("/v1/predict", "/v1/embed")]  # fmt: skip
                await asyncio.to_thread(s.wait_for_metric, "resfit_queue_depth", 2)
                refused = await c.post("/v1/embed", content=body)
                return [refused, *await asyncio.gather(*waiting)]

        refused, predicted, embedded = asyncio.run(scenario())
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert "--max-queue" in refused.json()["error"]
        assert predicted.status_code == 200 and embedded.status_code == 200
        v = embedded.json()["embedding"]
        assert sum(x * x for x in v) == pytest.approx(1.0, abs=1e-4)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A two-class run whose class folder and run folder are named with Latin-1 bytes, and
    an image of the odd class."""
    import resfit

    root = tmp_path_factory.mktemp("odd-classes")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, rgb in ((os.fsdecode(b"caf\xe9"), (200, 40, 40)), ("tea", (40, 60, 200))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(6):
                colour_image(rgb, rng, 24).save(folder / f"{i}.png")
    out = tmp_path_factory.mktemp("odd-run") / "run"
    resfit.train(data=str(root), out=str(out), arch="resnet20_cifar", img_size=16, epochs=1,
                 progress=False, report=False, leakage="off", unknown_score="none")  # fmt: skip
    return out, (root / "val" / os.fsdecode(b"caf\xe9") / "0.png").read_bytes()


def test_non_utf8_class_and_run_names_give_valid_json(odd_run: tuple[Path, bytes]) -> None:
    run, body = odd_run
    s = Server(run)
    try:
        r = s.client.post("/v1/predict?top_k=2", content=body)
        assert r.status_code == 200, r.text
        names = {name for name, _ in r.json()["top_k"]}
        assert names == {"caf\\xe9", "tea"}  # shown as the CSVs and logs show it
        # A file name in Latin-1 bytes, as an old client may send it: by hand (httpx won't).
        form = (b"--b\r\nContent-Disposition: form-data; name=files; filename=caf\xe9.png\r\n"
                b"Content-Type: image/png\r\n\r\n" + body + b"\r\n--b--\r\n")  # fmt: skip
        r = s.client.post("/v1/predict", content=form,
                          headers={"content-type": "multipart/form-data; boundary=b"})  # fmt: skip
        assert r.status_code == 200 and {a["label"] for a in r.json()} <= names, r.text
    finally:
        s.stop()
    # A run folder named with such bytes (safetensors cannot load from one yet: by name here).
    from starlette.testclient import TestClient

    from resfit.apps.serving.app import ServeOptions, create_app
    from resfit.inference.predictor import Predictor

    app = create_app(Predictor.from_run(run), ServeOptions(), run_name=os.fsdecode(b"run-\xff"))
    with TestClient(app) as c:
        r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["run"] == "run-\\xff", r.text


def test_an_exception_in_a_handler_is_a_counted_json_500(run_dir: Path, images) -> None:
    from starlette.testclient import TestClient

    from resfit.apps.serving.app import ServeOptions, create_app
    from resfit.inference.predictor import Predictor

    predictor = Predictor.from_run(run_dir, engine="torch")
    real, calls = predictor.probabilities, []

    def failing(logits):  # the warm-up passes, every request after it fails
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return real(logits)

    predictor.probabilities = failing
    for framework in ("starlette", "fastapi"):
        calls.clear()
        app = create_app(predictor, ServeOptions(), framework=framework)
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.post("/v1/predict", content=images[0].read_bytes())
            assert r.status_code == 500 and r.json()["error"], framework
            text = c.get("/metrics").text
        assert 'resfit_requests_total{code="500",path="/v1/predict"} 1.0' in text, framework


def test_workers_take_ctrl_c_once_and_answer_the_requests_in_flight(
    run_dir: Path,
    images,
) -> None:
    s = Server(run_dir, "--workers", "2", "--max-wait-ms", "2000")
    try:

        async def scenario() -> httpx.Response:
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
                task = asyncio.create_task(c.post("/v1/predict", content=images[0].read_bytes()))
                await asyncio.to_thread(s.wait_for_metric, "resfit_queue_depth", 1)
                os.killpg(s.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the group
                return await task

        r = asyncio.run(scenario())
        assert r.status_code == 200 and r.json()["label"]
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()


def test_a_dead_worker_is_restarted_logged_and_its_gauges_cleared(
    run_dir: Path,
    images,
    tmp_path: Path,
) -> None:
    s = Server(run_dir, "--workers", "2", env={"TMPDIR": str(tmp_path)})

    def until(condition, what: str, timeout: float = 120) -> None:
        """Wait on a condition (a worker starts in seconds, or minutes on a loaded machine)."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    try:
        (metrics,) = tmp_path.glob("resfit-metrics-*")
        victim, other = _worker_pids(s)
        gauge = metrics / f"gauge_livesum_{victim}.db"
        until(gauge.exists, "the worker never made its metrics")  # /readyz was the other's
        os.kill(victim, signal.SIGKILL)
        pids: list[int] = []

        def replaced() -> bool:
            pids[:] = _worker_pids(s)
            return victim not in pids and len(pids) >= 2

        until(replaced, "no new worker")
        assert other in pids and not gauge.exists()
        (new,) = set(pids) - {other}
        until((metrics / f"gauge_livesum_{new}.db").exists, "the new worker never started")
        s.client.close()  # its kept-alive connection may have been the victim's
        s.client = httpx.Client(base_url=s.url, timeout=60)
        s.wait_for_metric("resfit_queue_depth", 0, timeout=60)
        for _ in range(4):  # both workers answer (each connection may reach either)
            with httpx.Client(base_url=s.url, timeout=120) as c:
                r = c.post("/v1/predict", content=images[0].read_bytes())
                assert r.status_code == 200, r.text
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=60) == 0
        err = s.proc.communicate()[1]
        assert f"worker {victim} exited with code -9; starting another" in err
    finally:
        s.stop()


def _in_process(run: Path, **options):
    """An in-process app of a random tiny run, and its service (the handlers' owner)."""
    from resfit.apps.serving.app import ServeOptions, create_app
    from resfit.inference.predictor import Predictor

    app = create_app(Predictor.from_run(run, engine="torch"), ServeOptions(**options))
    service = next(r.endpoint.__self__ for r in app.routes if r.path == "/v1/predict")
    return app, service


def _png(rgb: tuple[int, int, int]) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_explain_takes_the_queue_and_one_pass_per_batch(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from tests.test_inference import make_run

    app, service = _in_process(make_run(tmp_path), max_queue=4, max_wait_ms=50)
    passes, predictor = [], service.predictor
    real = predictor.scored_probabilities
    with TestClient(app) as c:  # counted after the warm-up
        predictor.scored_probabilities = lambda d, **kw: passes.append(len(d)) or real(d, **kw)
        files = [("f", (f"{i}.png", _png((60 * i, 90, 200)), "image/png")) for i in range(3)]
        many = c.post("/v1/explain", files=files)
        assert many.status_code == 200, many.text
        assert [m["file"] for m in many.json()] == ["0.png", "1.png", "2.png"]
        assert passes == [3]  # the predicted classes of the 3 images: one forward pass
        service.batcher.pending = 4  # the queue is full: one more image does not fit
        r = c.post("/v1/explain", content=_png((1, 2, 3)))
        assert r.status_code == 503 and "--max-queue" in r.json()["error"], r.text
        service.batcher.pending = 0


def test_a_bad_file_is_named_and_cancels_the_other_decodes(tmp_path: Path, monkeypatch) -> None:
    from starlette.testclient import TestClient

    from resfit.apps.serving import app as serving
    from tests.test_inference import make_run

    calls = []
    real = serving.image_pixels

    def counted(data: bytes, *args):
        calls.append(data[:4])
        if data.startswith(b"\x89PNG"):
            time.sleep(0.2)  # a good file takes a while: the bad one fails first
        return real(data, *args)

    monkeypatch.setattr(serving, "image_pixels", counted)
    app, _ = _in_process(make_run(tmp_path), decode_threads=1)
    good = _png((10, 200, 30))
    files = [("f", ("bad.png", b"not an image", "image/png"))]
    files += [("f", (f"{i}.png", good, "image/png")) for i in range(10)]
    with TestClient(app) as c:
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 415 and r.json()["error"].startswith("bad.png: not an image")
        assert len(calls) <= 3, f"{len(calls)} of 11 files read after the bad one failed"
        calls.clear()  # and a request of good files reads each once
        assert c.post("/v1/predict", files=files[1:4]).status_code == 200 and len(calls) == 3


def test_the_queue_gauge_has_one_owner(tmp_path: Path, monkeypatch) -> None:
    """Set by the batcher when its queue grows and shrinks: twice per request, never by the
    handlers or a scrape, and back at 0 after the request."""
    import prometheus_client
    from starlette.testclient import TestClient

    from tests.test_inference import make_run

    sets = []
    real = prometheus_client.Gauge.set

    def recorded(gauge, value: float) -> None:
        if gauge._name == "resfit_queue_depth":
            sets.append(value)
        real(gauge, value)

    monkeypatch.setattr(prometheus_client.Gauge, "set", recorded)
    app, _ = _in_process(make_run(tmp_path))
    with TestClient(app) as c:
        sets.clear()
        assert c.post("/v1/predict", content=_png((10, 20, 200))).status_code == 200
        assert "resfit_queue_depth 0.0" in c.get("/metrics").text
    assert sets == [1, 0]

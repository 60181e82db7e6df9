"""Shared fixtures: the real assets in ../shared, a local weights mirror, small image folders."""

from __future__ import annotations

import functools
import http.server
import os
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest

# Caches (OpenVINO's compiled and converted models, downloaded weights) go to a folder of this
# session, never to the user's ~/.cache; fixtures that need their own still set their own.
os.environ.setdefault("RESFIT_CACHE_DIR", tempfile.mkdtemp(prefix="resfit-test-cache-"))

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
CIFAR_CKPTS = ASSETS / "resnet-cifar10"
CIFAR_ZIP = ASSETS / "datasets" / "cifar10-jpg.zip"
FLOWERS_ZIP = ASSETS / "datasets" / "flowers5-256.zip"


@pytest.fixture(autouse=True)
def _signal_stack_stays_sound():
    """Every test leaves the main thread's alternate signal stack mapped: a library that frees it
    (OpenVINO's CPU plugin did) makes a later test die with SIGSEGV far from the cause."""
    yield
    if threading.current_thread() is threading.main_thread():
        from resfit.core.sigstack import signal_stack, signal_stack_is_sound

        assert signal_stack_is_sound(), (
            f"this test left the alternate signal stack {signal_stack()} unmapped: the next "
            "signal handler would crash the process (see resfit.core.sigstack)"
        )


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared real assets, absent on this checkout)")
    return path


def _extract(zip_path: Path, factory: pytest.TempPathFactory, name: str) -> Path:
    need(zip_path)
    out = factory.mktemp(name)
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(out)
    return out


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cifar10-jpg extracted once per session: train/<class>/*.jpg and test/<class>/*.jpg."""
    return _extract(CIFAR_ZIP, tmp_path_factory, "cifar10")


@pytest.fixture(scope="session")
def flowers_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """flowers5-256 extracted once per session: train/ and val/ of five classes."""
    return _extract(FLOWERS_ZIP, tmp_path_factory, "flowers5")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def file_server():
    """Start an HTTP server on 127.0.0.1 serving a folder; yields a function folder -> base URL."""
    servers = []

    def serve(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/"

    yield serve
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture()
def cifar_mirror(file_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CIFAR checkpoints served over HTTP as the weights mirror, with an empty cache."""
    need(CIFAR_CKPTS)
    monkeypatch.setenv("RESFIT_WEIGHTS_MIRROR", file_server(CIFAR_CKPTS))
    cache = tmp_path / "cache"
    monkeypatch.setenv("RESFIT_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def airplane_frog_run(cifar10_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that tells cifar10-jpg's airplanes from its frogs: resnet20 from the CIFAR-10
    checkpoint, its head trained 3 epochs on 100 photos of each (the slices and video tests share it)."""
    from resfit.training import train

    data = tmp_path_factory.mktemp("airfrog")
    for cls in ("airplane", "frog"):
        (data / cls).mkdir()
        for p in sorted((cifar10_root / "train" / cls).glob("*.jpg"))[:100]:
            (data / cls / p.name).symlink_to(p)
    run = data.parent / (data.name + "-run")
    train(data=str(data), out=str(run), arch="resnet20_cifar", img_size=32, epochs=3,
          weights=str(need(CIFAR_CKPTS / "resnet20-12fca82f.th")), freeze="backbone",
          warmup_epochs=0, batch_size=32, progress=False, report=False, leakage="off",
          precise_bn=0, augment="none")  # fmt: skip
    return run

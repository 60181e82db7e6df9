"""``resfit serve RUN``: a trained run as an HTTP service with dynamic batching.

    resfit serve runs/flowers --port 8000 --max-batch 32 --max-wait-ms 5
    curl --data-binary @rose.jpg 'http://127.0.0.1:8000/v1/predict?top_k=3'

Routes: ``POST /v1/predict`` (raw image body, or multipart files for a list), ``POST /v1/embed``,
``GET /healthz``, ``/readyz``, ``/metrics`` (Prometheus) and the OpenAPI docs at ``/docs``.
The service itself is :mod:`resfit.apps.serving`; this module parses the options, checks the bind
address, and runs uvicorn in one process or in ``--workers`` processes that share one socket
(``/metrics`` then sums over the workers: prometheus_client's multiprocess mode, in a
temporary folder this process owns and removes).

Bad requests cannot take it down: each image's size is checked from its header against
``--max-pixels`` before it is decoded, a request holds at most ``--max-images`` images,
``--max-request-pixels`` pixels and ``--max-queue`` images (413 naming the limit over any).
Under ``--workers`` a worker that dies is logged and replaced.

It binds to 127.0.0.1 by default. Any other address needs a token (``--token`` or
``RESFIT_SERVE_TOKEN``) that every request must send as ``Authorization: Bearer TOKEN``.
SIGTERM (or Ctrl-C) stops accepting connections, answers the requests in flight, and exits 0.

Building the parser imports neither torch nor the web stack: ``resfit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import ConfigError, MissingExtraError, ResfitError

__all__ = ["TOKEN_ENV", "add_serve_parser", "check_bind", "main", "serve"]

TOKEN_ENV = "RESFIT_SERVE_TOKEN"
# The decoding budget (issue 26). 40 M pixels: a 48 MP phone photo is refused, a 6000 x 4000
# camera's is not; 4 images at the limit decode to about 0.5 GB of RGB at once.
MAX_PIXELS = 40_000_000
MAX_IMAGES = 64
log = logging.getLogger("resfit")


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` with its options to ``resfit``'s subcommands; ``func`` runs it."""
    p = subparsers.add_parser(
        "serve",
        help="serve a run over HTTP (dynamic batching, metrics, health checks)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("run", help="the run folder to serve")
    # The same default as resfit predict: the same engine gives the same confidences.
    p.add_argument("--engine", default="auto", metavar="ENGINE",
                   help="auto (the default, as resfit predict: the fastest installed engine "
                        "here), torch, openvino, onnx (after resfit export), or tensorrt (GPUs)")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    from .commands import add_trust_arguments  # argparse only: no torch

    add_trust_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs --token)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32,
                   help="most images per forward pass (1 turns batching off)")  # fmt: skip
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the first image of a batch waits for others")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=256,
                   help="images waiting for the model before requests get 503")  # fmt: skip
    p.add_argument("--max-body-mb", type=float, default=20.0,
                   help="largest request body; bigger ones get 413")  # fmt: skip
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"most pixels per image, from its header before decoding; bigger "
                        f"ones get 413 (default {MAX_PIXELS:,})")  # fmt: skip
    p.add_argument("--max-images", type=int, default=MAX_IMAGES,
                   help=f"most images per request (default {MAX_IMAGES}); more get 413")  # fmt: skip
    p.add_argument("--max-request-pixels", type=int, default=None,
                   help="most pixels per request, all its images together (default: 4 x "
                        "--max-pixels); more get 413")  # fmt: skip
    p.add_argument("--workers", type=int, default=1,
                   help="server processes, each with its share of the cores")  # fmt: skip
    p.add_argument("--token", default=None,
                   help=f"bearer token every request must send (default: ${TOKEN_ENV})")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads in all (default: this process's fair share)")  # fmt: skip
    p.add_argument("--fd", type=int, default=None, help=argparse.SUPPRESS)  # a worker's socket
    p.set_defaults(func=serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse a bind that other machines can reach unless requests must carry a token."""
    if not _is_loopback(host) and not token:
        raise ConfigError(
            f"--host {host} lets other machines send requests: set --token TOKEN "
            f"(or ${TOKEN_ENV}) so that each request must carry it, or bind --host 127.0.0.1"
        )


def _check_options(args: argparse.Namespace) -> None:
    if args.max_request_pixels is None:
        args.max_request_pixels = 4 * args.max_pixels
    for name in ("max_batch", "max_queue", "workers", "max_pixels", "max_images",
                 "max_request_pixels"):  # fmt: skip
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_wait_ms < 0:
        raise ConfigError("--max-wait-ms must be 0 or more")
    if args.max_body_mb <= 0:
        raise ConfigError("--max-body-mb must be more than 0")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a TCP port (0-65535)")


def serve(args: argparse.Namespace) -> int:
    """Run the service until SIGTERM or Ctrl-C; 0 after a graceful shutdown."""
    token = args.token or os.environ.get(TOKEN_ENV) or None
    _check_options(args)
    check_bind(args.host, token)
    if not Path(args.run).is_dir():
        raise ConfigError(f"{args.run} is not a run folder (train one with resfit train)")
    for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                            ("prometheus_client", "prometheus-client"),
                            ("multipart", "python-multipart")):  # fmt: skip
        try:
            __import__(module)
        except ImportError:
            raise MissingExtraError(package, "serve") from None
    if args.workers > 1 and args.fd is None:
        return _supervise(args, token)
    return _serve_one(args, token)


def _serve_one(args: argparse.Namespace, token: str | None) -> int:
    import uvicorn
    from PIL import Image

    from ..core import threads
    from ..inference.predictor import Predictor
    from .commands import trust_options
    from .serving.app import ServeOptions, create_app

    if args.fd is not None:  # a --workers process: the supervisor sends SIGTERM, once
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    threads.configure(args.threads)
    Image.MAX_IMAGE_PIXELS = None  # the limit is --max-pixels, checked before decoding
    predictor = Predictor.from_run(
        args.run,
        engine=args.engine,
        device=args.device,
        precision=args.precision,
        **trust_options(args),
    )
    options = ServeOptions(
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_body_mb=args.max_body_mb, token=token, max_pixels=args.max_pixels,
        max_images=args.max_images, max_request_pixels=args.max_request_pixels,
    )  # fmt: skip
    app = create_app(predictor, options, run_name=Path(args.run).name)
    bind = {"fd": args.fd} if args.fd is not None else {"host": args.host, "port": args.port}
    config = uvicorn.Config(
        app, **bind, log_level="warning", access_log=False, timeout_graceful_shutdown=30
    )
    server = _graceful_server(config, worker=args.fd is not None)
    if args.fd is None:
        where = f"http://{args.host}:{args.port}"
        print(f"serving {args.run} on {where} ({predictor.engine.describe()})", flush=True)
    server.run()
    return 0 if server.started else 1


def _server_class(worker: bool = False) -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server without re-raising SIGTERM after the drain: a graceful stop
        exits 0, as process supervisors (systemd, Kubernetes) expect."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            import threading

            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGTERM,) if worker else (signal.SIGINT, signal.SIGTERM)
            before = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, handler in before.items():
                    signal.signal(s, handler)

    return Server


def _graceful_server(config: object, worker: bool = False) -> object:
    return _server_class(worker)(config)


def _supervise(args: argparse.Namespace, token: str | None) -> int:
    """Bind once, start ``--workers`` server processes on the shared socket, each with its
    share of the cores (:func:`resfit.core.threads.child_env`), and pass SIGTERM on to them."""
    from ..core import threads

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise ConfigError(f"cannot bind {args.host}:{args.port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    env = threads.child_env(threads.child_threads(args.workers, args.threads))
    if token:  # in the environment, not on the command line where ps shows it
        env[TOKEN_ENV] = token
    # /metrics sums over the workers: each writes its values to files in this folder.
    metrics_dir = env.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="resfit-metrics-")
    owned = "PROMETHEUS_MULTIPROC_DIR" not in env
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    argv = [sys.executable, "-m", "resfit.apps.serve", *_worker_argv(args),
            "--fd", str(sock.fileno())]  # fmt: skip
    workers = _Workers(argv, env, sock.fileno(), metrics_dir)
    try:
        workers.run(args.workers, f"serving {args.run} on http://{args.host}:{args.port}: "
                    f"{args.workers} workers, CPU threads each: {env['RESFIT_THREADS']}")  # fmt: skip
    finally:
        sock.close()
        if owned:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0 if workers.clean else 1


class _Workers:
    """The worker processes of ``--workers N``: started, restarted when one dies (its
    multiprocess gauges cleared), and stopped with one SIGTERM each on SIGINT or SIGTERM.

    The workers ignore SIGINT: a Ctrl-C in a terminal reaches the whole process group, and
    uvicorn takes a second SIGINT as "exit now", cutting the requests in flight. A second
    Ctrl-C at the supervisor does mean that: the workers are killed.
    """

    RESTARTS, WINDOW_S = 5, 60.0  # more deaths than this within the window: give up

    def __init__(self, argv: list[str], env: dict, fd: int, metrics_dir: str) -> None:
        self.argv, self.env, self.fd, self.metrics_dir = argv, env, fd, metrics_dir
        self.children: list[subprocess.Popen] = []
        self.stopping: list[int] = []
        self.deaths: list[float] = []
        self.clean = True

    def _start(self) -> None:
        # SIGINT ignored from the first instruction (a Python started so keeps it ignored).
        child = subprocess.Popen(self.argv, env=self.env, pass_fds=(self.fd,),
                                 preexec_fn=_ignore_sigint)  # fmt: skip
        self.children.append(child)
        if self.stopping:  # a signal came while it started: it gets one too
            child.send_signal(signal.SIGTERM)

    def _forward(self, sig: int, _frame: object) -> None:
        again = bool(self.stopping)
        self.stopping.append(sig)
        for c in self.children:
            if c.poll() is None:
                c.send_signal(signal.SIGKILL if again and sig == signal.SIGINT else signal.SIGTERM)

    def run(self, n: int, banner: str) -> None:
        # The handlers come first: a signal during the start is passed on, never lost.
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._forward)
        for _ in range(n):
            if not self.stopping:
                self._start()
        print(banner, flush=True)
        while not self.stopping or any(c.poll() is None for c in self.children):
            time.sleep(0.2)
            if not self.stopping:
                self._restart_dead()
        # A worker still loading its model when the signal came dies of it: a clean stop too.
        codes = [c.returncode for c in self.children]
        self.clean = self.clean and all(c in (0, -signal.SIGTERM) for c in codes)

    def _restart_dead(self) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        for c in [c for c in self.children if c.poll() is not None]:
            self.children.remove(c)
            mark_process_dead(c.pid, self.metrics_dir)  # its live gauges leave the sums
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < self.WINDOW_S] + [now]
            if len(self.deaths) > self.RESTARTS:
                log.error("resfit serve: worker %d exited with code %s; %d workers died within "
                          "%g s: stopping", c.pid, c.returncode, len(self.deaths), self.WINDOW_S)  # fmt: skip
                self.clean = False
                self._forward(signal.SIGTERM, None)
                return
            log.warning("resfit serve: worker %d exited with code %s; starting another",
                        c.pid, c.returncode)  # fmt: skip
            self._start()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_argv(args: argparse.Namespace) -> list[str]:
    out = [str(args.run)]
    for name in ("engine", "device", "precision", "host", "port", "max_batch", "max_wait_ms",
                 "max_queue", "max_body_mb", "max_pixels", "max_images",
                 "max_request_pixels"):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m resfit.apps.serve RUN ...``: the same as ``resfit serve``, before the CLI has it."""
    parser = argparse.ArgumentParser(prog="resfit")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except ResfitError as e:
        print(f"resfit serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The fork sites are safe with threads running: DataLoader workers start by ``fork`` (the decoded
images are then shared copy-on-write, not pickled to each worker every epoch), while OpenMP,
OpenVINO's TBB pool and other Python threads are busy in the parent.

Why fork holds here: a worker only runs Python and one-thread torch ops (``worker_init``), and
every lock it can touch is reset in the child by its owner (glibc's malloc, CPython's GIL and
import lock, logging's handler locks, torch's thread pools through ``pthread_atfork``); it
never calls OpenVINO, ONNX Runtime or the server. This test is the evidence: it forks workers
again and again while the other runtimes run flat out, with a timeout on every batch."""

from __future__ import annotations

import threading

import torch

from resfit.data.datasets import DecodedImages, TransformedImages, iter_batches


def _transform(image: torch.Tensor) -> torch.Tensor:  # a conv: would use OpenMP if it could
    x = image.float().unsqueeze(0) / 255
    return torch.nn.functional.conv2d(x, torch.ones(4, 3, 3, 3) / 27, padding=1)[0]


def test_data_workers_fork_safely_while_openmp_and_openvino_threads_run() -> None:
    images = [torch.full((3, 24, 24), i, dtype=torch.uint8) for i in range(32)]
    dataset = TransformedImages(DecodedImages(images, torch.arange(32), [], [], 24), _transform)
    expected = torch.stack([_transform(im) for im in images])
    stop = threading.Event()

    def busy_torch() -> None:  # keeps the parent's OpenMP pool hot
        a = torch.randn(256, 256)
        while not stop.is_set():
            a = torch.tanh(a @ a)

    busy = [threading.Thread(target=busy_torch, daemon=True)]
    try:
        from resfit.inference.openvino import OpenVinoEngine, convert

        engine = OpenVinoEngine(
            convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten()), 32),
            "fp32", cache=False,
        )  # fmt: skip

        def busy_openvino() -> None:
            x = torch.randn(4, 3, 32, 32)
            while not stop.is_set():
                engine(x)

        busy.append(threading.Thread(target=busy_openvino, daemon=True))
    except ImportError:
        pass  # the OpenMP and Python threads are still there
    for t in busy:
        t.start()
    try:
        order = [list(range(i, i + 8)) for i in range(0, 32, 8)]
        for _ in range(6):  # each round forks two fresh workers
            got = list(iter_batches(dataset, order, workers=2))
            assert len(got) == 4
            assert torch.allclose(torch.cat([x for x, _ in got]), expected, atol=1e-5)
            assert torch.equal(torch.cat([y for _, y in got]), torch.arange(32))
    finally:
        stop.set()
        for t in busy:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in busy)


def test_workers_run_one_thread_each() -> None:
    class Threads(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            return torch.tensor(torch.get_num_threads()), torch.tensor(i)

    got = list(iter_batches(Threads(), [[0, 1], [2, 3]], workers=2))
    assert all(int(x.max()) == 1 for x, _ in got)  # worker_init: the cores stay the model's

"""The deployment table (issue 29, item 4): a run fine-tuned from a real CIFAR-10 checkpoint,
exported to every small-device format (ExecuTorch/XNNPACK, LiteRT and NCNN fp32; ExecuTorch
and LiteRT int8 calibrated on 100 training photos; CoreML, structure only), then
``resfit bench deploy``: per format and precision, size, top-1 and ECE change against PyTorch
on the 300 validation photos, batch-1 latency with 1 and with every thread, images/s, and the
ratio to the baseline (eager PyTorch fp32, the same run) measured in the same process.

    flock /work/cpu.lock python bench/deploy.py [--arch resnet56_cifar]

Machine: 2-core AMD EPYC (Zen 4, AVX512_BF16), torch 2.14.1, executorch 1.5.1, ai-edge-litert
2.3.0 with litert-torch 0.10.0, ncnn 1.0.20261020 / pnnx 20261020. Last figures (resnet20_cifar,
32 px, 40 train + 30 val photos per class of cifar10-jpg, 1 epoch from the checkpoint; the
baseline is eager PyTorch fp32 in the same process), images/s at batch 1, both threads:
    PyTorch fp32 356 (1.00x); ExecuTorch fp32 1973 (5.54x), int8 4073 (11.44x, top-1 +0.33);
    LiteRT fp32 1743 (4.90x), int8 3262 (9.16x, top-1 +0.67); NCNN fp32 1881 (5.28x).
The whole table is in docs/guide/small-devices.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def _photos(out: Path, train: int = 40, val: int = 30) -> Path:
    with zipfile.ZipFile(ASSETS / "datasets" / "cifar10-jpg.zip") as z:
        groups: dict[tuple[str, str], list[str]] = {}
        for n in z.namelist():
            parts = n.split("/")
            if len(parts) == 3 and parts[2].endswith(".jpg"):
                groups.setdefault((parts[0], parts[1]), []).append(n)
        for (split, cls), files in groups.items():
            dest = out / ("val" if split == "test" else "train") / cls
            dest.mkdir(parents=True, exist_ok=True)
            for f in sorted(files)[: val if split == "test" else train]:
                (dest / Path(f).name).write_bytes(z.read(f))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet20_cifar")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="resfit-deploy-"))
    os.environ["RESFIT_WEIGHTS_MIRROR"] = str(ASSETS / "resnet-cifar10")
    os.environ["RESFIT_CACHE_DIR"] = str(work / "cache")
    from resfit.apps.benchmark.deploy import bench_deploy
    from resfit.export.run import export_run
    from resfit.training import train

    try:
        photos = _photos(work / "photos")
        run = work / "run"
        train(data=str(photos), out=str(run), arch=args.arch, weights="pretrained", epochs=1,
              batch_size=32, lr=0.01, progress=False, report=False, leakage="off",
              precision="fp32")  # fmt: skip
        for fmt, int8 in (
            ("executorch", True),
            ("litert", True),
            ("ncnn", False),
            ("coreml", False),
        ):
            rep = export_run(run, format=fmt, int8=int8, calib=photos / "train", calib_images=100)
            print(f"{fmt}: converted in {rep.get('convert_s')} s"
                  + (f", int8 in {rep.get('int8_convert_s')} s" if int8 else ""), flush=True)  # fmt: skip
        print(bench_deploy(run, repeats=args.repeats).format())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

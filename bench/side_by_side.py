# Two resfit jobs on one machine: does each take its share of the cores? (issue 13, defect 13)
#
# Each job is a process that times the CIFAR ResNet-56 training step at 32 px, batch 128,
# through resfit's TrainStep at the precision `auto` picks, for --seconds after a warm-up.
# Both start together (a shared start signal) and run side by side:
#   every core: each process takes all the CPUs (`--threads` = the CPU count), as every
#               resfit process did before the fix;
#   fair share: the default now, each process takes CPUs / live resfit processes.
# Also one job alone, as the reference. The figure that matters is the sum of the two jobs'
# images/s against the lone job's, and the slower job of the pair.
#
# Command (from the repository root; ~2 min):  python bench/side_by_side.py [--seconds 20]
#
# Last figures (2 cores of an AMD EPYC Zen 4, bf16 picked by `auto`, torch 2.14.1, 2026-11-29):
#   alone:       327 img/s (2 threads)
#   every core:   85 +  88 = 172 img/s (2/2 threads): the pair does 0.53x one job's work
#   fair share:  168 + 177 = 345 img/s (1/1 threads): 1.05x, each job 0.51x of alone
"""Two training processes side by side: every core each, vs each its fair share."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT

JOB = """
import json, sys, time, torch
from pathlib import Path
from resfit.core import threads
from resfit.models.resnet import build_model
from resfit.core.runtime import pick_precision
from resfit.tasks.single import SingleLabel
from resfit.training.step import TrainStep
n = threads.configure(int(sys.argv[1]) if sys.argv[1] != "auto" else None)
start, seconds = Path(sys.argv[2]), float(sys.argv[3])
model = build_model("resnet56_cifar", num_classes=10).train().to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
prec = pick_precision(torch.device("cpu"), "auto")
step = TrainStep(opt, SingleLabel().loss, torch.device("cpu"), prec)
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
step(model, x, y)
Path(str(start) + f".{sys.argv[4]}").touch()
while not start.exists():
    time.sleep(0.01)
threads.rebalance()
t, done = time.perf_counter(), 0
while time.perf_counter() - t < seconds:
    step(model, x, y)
    done += 128
print(json.dumps({"threads": torch.get_num_threads(), "img_s": done / (time.perf_counter() - t), "precision": prec}))
"""


def _jobs(threads: list[str], seconds: float) -> list[dict]:
    folder = Path(tempfile.mkdtemp(prefix="resfit-side-"))
    start = folder / "start"
    env = {**os.environ, "RESFIT_PROC_DIR": str(folder / "procs"), "PYTHONPATH": str(ROOT / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", JOB, t, str(start), str(seconds), str(i)],
                              stdout=subprocess.PIPE, text=True, env=env)
             for i, t in enumerate(threads)]  # fmt: skip
    while not all((folder / f"start.{i}").exists() for i in range(len(threads))):
        time.sleep(0.05)
    start.touch()  # all warmed up: go together
    return [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    cpus = str(len(os.sched_getaffinity(0)))
    alone = _jobs(["auto"], args.seconds)[0]
    print(f"alone: {alone['img_s']:.0f} img/s ({alone['threads']} threads, {alone['precision']})")
    for name, threads in (("every core", [cpus, cpus]), ("fair share", ["auto", "auto"])):
        pair = _jobs(threads, args.seconds)
        rates = [p["img_s"] for p in pair]
        print(f"{name:>10}: {' + '.join(f'{r:.0f}' for r in rates)} = {sum(rates):.0f} img/s "
              f"({'/'.join(str(p['threads']) for p in pair)} threads); sum {sum(rates) / alone['img_s']:.2f}x "
              f"alone, slower job {min(rates) / alone['img_s']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()

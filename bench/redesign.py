# The training-core redesign (issue 13) must not slow the hot paths. This times them with the
# code before it and after it, alternately, on the same machine:
#   step:     resfit's ResNet-50 training step at 224 px, batch 32, at the precision `auto`
#             picks (`resfit.apps.benchmark.train.bench_train_step`, medians of 3 rounds; its naive row
#             is printed too, as the in-run reference for machine noise);
#   finetune: `resfit.train(freeze="backbone", augment="none")`, the head-only fine-tune of
#             bench/finetune.py (ResNet-50, 224 px, 10 epochs, 300 train / 150 val flowers5
#             photos, feature cache), wall time from the folder to the trained head.
# The package layout (issue 25) is checked the same way, "before" = de82475 (--skip-finetune):
#   2 cores of an AMD EPYC Zen 4 (AVX512_BF16, auto = bf16), quiet, 2026-12-06, --rounds 3:
#   step before 11.60 img/s, after 12.07 (1.041x); the naive row in the same runs 4.07 and 4.23
#   (1.04x): the same speed, the machine drifting alike on both sides (resfit/naive 2.85 both).
#   A first --rounds 2 run read 1.154x with its naive row at 1.056x (9.55/3.60 vs 11.01/3.80).
# "before" is a checkout of the commit before the redesign (c7da56a): make one with
#   git worktree add /tmp/old-main c7da56a
# and run, from the repository root with ../shared/assets present (~12 min on 2 cores):
#   python bench/redesign.py --old /tmp/old-main [--rounds 2]
#
# Last figures (2 cores of an AMD EPYC Zen 4, AVX512_BF16, so `auto` = bf16; torch 2.14.1;
# quiet; 2026-11-29):
#   step (--rounds 2, medians): before 12.12 img/s, after 12.18 (1.005x); the naive row in the
#     same runs 3.48 and 3.59 img/s
#   head-only fine-tune (--rounds 3 --skip-step, medians): before 18.5 s, after 18.4 s
#     (0.997x); the same best val accuracy (0.213) on both sides
#   (A first fine-tune run read 19.6 vs 23.5 s: the clock then included `import resfit`'s
#   imports, which are lazy now and so moved inside it; cProfile put train() itself at 19.0 s
#   before and 18.6 s after. The snippet now imports before the clock.)
"""Training step and head-only fine-tune: the code before the redesign against today's."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from _common import FLOWERS_ZIP, ROOT

STEP = """
import json
try:  # the package layout (issue 25) moved the benchmarks; "before" may predate it
    import resfit.apps.benchmark.train as b
except ImportError:
    import resfit.benchmark as b
rep = b.bench_train_step("resnet50", batch=32, img_size=224, repeats=3)
print(json.dumps({r.name: r.images_per_s for r in rep.rows}))
"""
FINETUNE = """
import json, sys, time
from resfit.training import train  # imported before the clock: `import resfit` is lazy now
t = time.perf_counter()
r = train(data=sys.argv[1], out=sys.argv[2], arch="resnet50", freeze="backbone",
                 augment="none", epochs=10, lr=3e-4, batch_size=64, progress=False,
                 report=False, leakage="off")
print(json.dumps({"seconds": time.perf_counter() - t, "val": r.best_val_accuracy}))
"""


def _subset(root: Path, train: int, val: int) -> Path:
    """A class-balanced subset of flowers5 as symlinks."""
    with zipfile.ZipFile(FLOWERS_ZIP) as z:
        z.extractall(root / "all")
    for split, n in (("train", train), ("val", val)):
        for cls in sorted((root / "all" / split).iterdir()):
            (root / "subset" / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[: n // 5]:
                (root / "subset" / split / cls.name / f.name).symlink_to(f)
    return root / "subset"


def _run(tree: Path, code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         env=env, timeout=1800)  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"{tree}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--old", type=Path, required=True, help="a checkout of the commit before")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-step", action="store_true", help="time the fine-tune only")
    ap.add_argument("--skip-finetune", action="store_true", help="time the step only")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="resfit-redesign-"))
    data = _subset(work, 300, 150)
    trees = {"before": args.old.resolve(), "after": ROOT}
    step: dict[str, list[dict]] = {k: [] for k in trees}
    tune: dict[str, list[dict]] = {k: [] for k in trees}
    for i in range(args.rounds):
        for name, tree in trees.items():  # alternate, so drift hits both sides alike
            step[name].append({} if args.skip_step else _run(tree, STEP))
            tune[name].append(
                {"seconds": float("nan"), "val": float("nan")}
                if args.skip_finetune
                else _run(tree, FINETUNE, str(data), str(work / f"{name}{i}"))
            )
            print(name, i, step[name][-1], tune[name][-1], flush=True)
    print(f"\n{'':8} {'step img/s (resfit, naive)':>28} {'head-only fine-tune s':>22} {'val':>6}")
    med = {}
    for name in trees:
        resfit_rows = [
            max(v for k, v in s.items() if k.startswith("resfit")) for s in step[name] if s
        ]
        naive_rows = [v for s in step[name] for k, v in s.items() if k.startswith("naive")]
        resfit_rows, naive_rows = resfit_rows or [float("nan")], naive_rows or [float("nan")]
        secs = statistics.median(t["seconds"] for t in tune[name]) if tune[name] else float("nan")
        med[name] = (statistics.median(resfit_rows), secs)
        print(f"{name:8} {med[name][0]:14.2f} {statistics.median(naive_rows):13.2f} "
              f"{secs:22.1f} {tune[name][-1]['val']:6.3f}")  # fmt: skip
    print(f"after / before: step {med['after'][0] / med['before'][0]:.3f}x, "
          f"fine-tune time {med['after'][1] / med['before'][1]:.3f}x")  # fmt: skip


if __name__ == "__main__":
    main()

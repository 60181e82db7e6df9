"""Knowledge distillation and quantization-aware training on real photos (flowers5, 64 px).

Measures (issue 29):
  teacher      CIFAR ResNet-56 (the real checkpoint resnet-cifar10/resnet56-*.th) fine-tuned
               on flowers5 at 64 px;
  labels       ResNet-20 student (from the resnet20-*.th checkpoint) trained on the labels alone;
  distilled    the same student, the same epochs, augmentation (light + MixUp/CutMix, the
               distill defaults) and seed, trained by ``resfit distill`` on the teacher's
               outputs: the baseline differs from it in the targets alone;
  both for 2 seeds (mean), best val accuracy on flowers5's val/ (736 photos).
Then, on seed 0's distilled student: fp32, post-training int8 (``export --int8 --calib`` on
256 training photos, ONNX Runtime QDQ) and int8 after ``--qat 2`` (the last 2 of the same
epochs quantization-aware, exported as it is), accuracies on the same val photos.
``--large`` adds the 224 px pair the issue also asks for, ResNet-50 (from scratch: no ImageNet
weights offline) -> ResNet-18; it was not run on this machine (hours on 2 cores).

Finished runs in --work are reused and a stopped one resumes from its last checkpoint, so a
bench stopped by its timeout continues where it was:
the whole bench is about 15 minutes, run in two holds of the CPU lock of at most 8 minutes.

Command (repository root, ../shared/assets present):
  flock /work/cpu.lock timeout 480 python bench/distill.py --epochs 4 --teacher-epochs 4

Last figures (2026-12-06, AMD EPYC Zen 4 with AVX512_BF16, 2 cores shared with other jobs,
bf16 autocast; --epochs 4 --teacher-epochs 4; best val accuracy on the 736 val photos):

  teacher ResNet-56 (4 epochs from the CIFAR checkpoint)      0.7323   195 s
  student ResNet-20    seed 0    seed 1    mean
    labels (baseline)  0.6970    0.6943    0.6957            67 s a run
    distilled          0.6073    0.6236    0.6155           111 s a run (teacher's forward)
  distilled - labels: -8.0 points (ratio 0.885x); distilled - teacher: -11.7 points.
  int8, seed 0 (ONNX Runtime, the 736 val photos):
    post-training (256 calibration photos)  fp32 0.6060 -> int8 0.6046  (-0.14 points)
    QAT (--qat 2 of the 4 epochs)            fp32 0.6019 -> int8 0.5978  (-0.41 points)
  Post-training int8 already loses under 0.5 points on this small network, and QAT keeps the
  loss under 0.5 points too, without being closer (-0.41 against -0.14): the issue's "QAT at
  least 0.5 points closer" has nothing to win here. The QAT epochs ran at 13 img/s (the first,
  with the graph's preparation, under contention) and 42 img/s, the bf16 epochs at 76 img/s:
  QAT runs in fp32 with the rounding simulated.

At 4 epochs distillation does NOT pay here: the student matching a 73 % teacher's soft outputs
(temperature 1, no labels, the Beyer et al. recipe) learns more slowly than on the labels
(train loss 0.17 KL vs 1.29 CE; val accuracy 0.42 / 0.58 / 0.61 / 0.60 by epoch against the
baseline's 0.48 / 0.65 / 0.69 / 0.70). Beyer et al. reach their gains with schedules of
hundreds to thousands of epochs ("patient"); this machine allows 4. The issue's +1.5 points is
not met by this run; --alt (temperature 2, labels' weight 0.5) and longer --epochs are the
next measurements to make, and --large was not run (hours on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run from a bare checkout too
    sys.path.insert(0, str(ROOT / "src"))
ASSETS = ROOT.parent / "shared" / "assets"
FLOWERS_ZIP = ASSETS / "datasets" / "flowers5-256.zip"
CKPT = ASSETS / "resnet-cifar10"
COMMON = ["--batch-size", "64", "--augment", "light", "--no-progress", "--no-report",
          "--leakage", "off"]  # fmt: skip


def resfit(*args: str) -> float:
    """Run ``resfit ARGS`` in this process (the bench runs under the CPU lock as a whole);
    returns its wall time."""
    from resfit.cli import main as cli_main

    t = time.perf_counter()
    if cli_main(list(args)):
        sys.exit(f"failed: resfit {' '.join(args)}")
    return time.perf_counter() - t


def extract(work: Path) -> Path:
    root = work / "flowers5"
    if not (root / "val").is_dir():
        with zipfile.ZipFile(FLOWERS_ZIP) as z:
            z.extractall(root)
    return root


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def train_once(run: Path, args: list[str]) -> float | None:
    """Train (or distil) into ``run`` unless it is finished already; its time, or None."""
    if (run / "summary.json").is_file():
        return None
    if (run / "checkpoints" / "last.pt").is_file():  # the timeout stopped it: continue it
        t = resfit("train", "--resume", "--out", str(run), "--no-progress")
    else:
        shutil.rmtree(run, ignore_errors=True)
        t = resfit(*args, "--out", str(run))
    print(f"{run.name}: {t:.0f} s", flush=True)
    return t


def export_int8(run: Path, data: Path, calib: bool) -> dict:
    report = run / "export" / "export.json"
    if not report.is_file():
        extra = ["--calib", str(data / "train")] if calib else []
        resfit("export", str(run), "--int8", "--val", str(data / "val"), *extra)
    return json.loads(report.read_text())


def pair(work: Path, data: Path, size: int, teacher: tuple[str, list[str]],
         student: tuple[str, list[str]], epochs: int, teacher_epochs: int,
         seeds: list[int], alt: list[str]) -> dict:  # fmt: skip
    """The teacher, then per seed the student on labels and distilled; QAT on seed 0's."""
    img = ["--img-size", str(size), *COMMON]
    t_run = work / f"teacher-{teacher[0]}-{size}"
    t = train_once(t_run, ["train", str(data), "--arch", teacher[0], *teacher[1], *img,
                           "--epochs", str(teacher_epochs)])  # fmt: skip
    out: dict = {"teacher": summary(t_run)["best_val_accuracy"], "teacher_s": t, "seeds": {}}
    mixing = ["--mixup", "0.8", "--cutmix", "1.0"]  # the distill defaults, for both students
    for seed in seeds:
        s = ["--epochs", str(epochs), "--seed", str(seed), *img, *mixing, *student[1]]
        lab, dis = work / f"labels-{student[0]}-{size}-s{seed}", work / f"distil-{student[0]}-{size}-s{seed}"  # fmt: skip
        lt = train_once(lab, ["train", str(data), "--arch", student[0], *s])
        dt = train_once(dis, ["distill", str(t_run), str(data), "--student", student[0], *s])
        out["seeds"][seed] = {"labels": summary(lab)["best_val_accuracy"], "labels_s": lt,
                              "distilled": summary(dis)["best_val_accuracy"], "distilled_s": dt}  # fmt: skip
    seed = seeds[0]
    if alt:  # another temperature / labels' weight, on the first seed
        s = ["--epochs", str(epochs), "--seed", str(seed), *img, *mixing, *student[1], *alt]
        run = work / f"distil-alt-{student[0]}-{size}-s{seed}"
        train_once(run, ["distill", str(t_run), str(data), "--student", student[0], *s])
        out["alt"] = {"options": " ".join(alt), "distilled": summary(run)["best_val_accuracy"]}
    dis = work / f"distil-{student[0]}-{size}-s{seed}"
    qat = work / f"qat-{student[0]}-{size}-s{seed}"
    s = ["--epochs", str(epochs), "--seed", str(seed), *img, *mixing, *student[1], "--qat", "2"]
    train_once(qat, ["distill", str(t_run), str(data), "--student", student[0], *s])
    ptq, q = export_int8(dis, data, calib=True), export_int8(qat, data, calib=False)
    out["int8"] = {"ptq_fp32": ptq["fp32_accuracy"], "ptq_int8": ptq["int8_accuracy"],
                   "qat_fp32": q["fp32_accuracy"], "qat_int8": q["int8_accuracy"],
                   "qat_from": q["int8_from"]}  # fmt: skip
    return out


def show(name: str, r: dict) -> None:
    seeds = r["seeds"]
    lab = statistics.mean(v["labels"] for v in seeds.values())
    dis = statistics.mean(v["distilled"] for v in seeds.values())
    print(f"\n{name}: teacher val accuracy {r['teacher']:.4f}")
    for seed, v in seeds.items():
        print(f"  seed {seed}: labels {v['labels']:.4f}  distilled {v['distilled']:.4f}")
    print(f"  mean: labels {lab:.4f} (baseline)  distilled {dis:.4f}  "
          f"gain {100 * (dis - lab):+.2f} points  ratio {dis / lab:.3f}x  "
          f"distilled - teacher {100 * (dis - r['teacher']):+.2f} points")  # fmt: skip
    if "alt" in r:
        a = r["alt"]
        print(f"  distilled with {a['options']}, seed {next(iter(seeds))}: {a['distilled']:.4f}")
    q = r["int8"]
    print(f"  int8, seed {next(iter(seeds))}: post-training fp32 {q['ptq_fp32']:.4f} -> int8 "
          f"{q['ptq_int8']:.4f} ({100 * (q['ptq_int8'] - q['ptq_fp32']):+.2f}); QAT fp32 "
          f"{q['qat_fp32']:.4f} -> int8 {q['qat_int8']:.4f} "
          f"({100 * (q['qat_int8'] - q['qat_fp32']):+.2f}; {q['qat_from']})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/resfit-bench-distill"))
    ap.add_argument("--epochs", type=int, default=4, help="student epochs")
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--large", action="store_true",
                    help="also ResNet-50 -> ResNet-18 at 224 px (hours on 2 cores)")  # fmt: skip
    ap.add_argument("--alt", default="--temperature 2 --hard-weight 0.5",
                    help="distill options of one more student, first seed ('' for none)")  # fmt: skip
    a = ap.parse_args()
    if not FLOWERS_ZIP.is_file():
        sys.exit(f"needs {FLOWERS_ZIP}")
    a.work.mkdir(parents=True, exist_ok=True)
    data = extract(a.work)
    cifar = ("resnet56_cifar", ["--weights", str(next(CKPT.glob("resnet56-*.th")))])
    student = ("resnet20_cifar", ["--weights", str(next(CKPT.glob("resnet20-*.th")))])
    r = pair(a.work, data, 64, cifar, student, a.epochs, a.teacher_epochs, a.seeds,
             a.alt.split())  # fmt: skip
    show("CIFAR ResNet-56 -> ResNet-20, flowers5 64 px", r)
    if a.large:
        big = pair(a.work, data, 224, ("resnet50", []), ("resnet18", []), a.epochs,
                   a.teacher_epochs, a.seeds, a.alt.split())  # fmt: skip
        show("ResNet-50 -> ResNet-18, flowers5 224 px", big)
    (a.work / "results.json").write_text(json.dumps({"cifar64": r}, indent=1))


if __name__ == "__main__":
    main()

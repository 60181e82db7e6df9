"""The HTML report: content, escaping, self-containment, and a real render in headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from resfit.inference.explain import grad_cam, overlay_cam
from resfit.insight.report import SECTION_IDS, TOP_WRONG, ReportData, write_report
from resfit.quality.leakage import Duplicate, find_duplicates
from resfit.tasks.calibration import fit_temperature

from .conftest import ASSETS, need

CHROMIUM = Path("/usr/bin/chromium")
EVIL = "<script>alert('x')</script>"


class _Doc(HTMLParser):
    """Collects ids, every src/href, the text of <script> tags and images by section."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self.section: str | None = None
        self.images: dict[str, list[str]] = {}
        self.meta: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(a["id"])
        if tag == "section":
            self.section = a.get("id")
        if tag == "script":
            self.scripts += 1
        if tag == "meta":
            self.meta.append(a)
        for key in ("src", "href", "action", "poster", "srcset"):
            if a.get(key) is not None:
                self.links.append(a[key])
        if tag == "img" and self.section:
            self.images.setdefault(self.section, []).append(a["src"])


def _parse(text: str) -> _Doc:
    doc = _Doc()
    doc.feed(text)
    return doc


def _decode(uri: str) -> Image.Image:
    head, payload = uri.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64")
    im = Image.open(io.BytesIO(base64.b64decode(payload)))
    im.load()
    return im


@pytest.fixture()
def synthetic(tmp_path: Path) -> tuple[ReportData, list[tuple[str, int]]]:
    rng = np.random.default_rng(0)
    classes = ["cat", EVIL, "a & b"]
    n = 60
    y_true = np.repeat(np.arange(3), n // 3)
    logits = rng.normal(0, 1, (n, 3)) + 1.2 * np.eye(3)[y_true]
    logits[:, 0] += 0.8  # a bias towards class 0 makes some confident mistakes
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    paths = []
    for i in range(n):
        p = img_dir / f"img_{i:02d}.png"
        Image.new("RGB", (64, 48), tuple(int(v) for v in rng.integers(0, 255, 3))).save(p)
        paths.append(str(p))
    calls: list[tuple[str, int]] = []

    def explain(path: str, cls: int) -> Image.Image:
        calls.append((path, cls))
        return Image.new("RGB", (64, 48), (255, 0, 0))

    dups = [Duplicate("train", Path("t/x.jpg"), "val", Path(f"v/{EVIL}.jpg"), "near", 3)]
    data = ReportData(
        title=f"Run {EVIL}",
        class_names=classes,
        y_true=y_true,
        logits=logits,
        paths=paths,
        history=[
            {
                "epoch": e,
                "train_loss": 1 / e,
                "train_acc": 0.5 + e / 10,
                "val_loss": 1.2 / e,
                "val_acc": None if e == 2 else 0.4 + e / 10,
            }
            for e in (1, 2, 3)
        ],
        config={"arch": "resnet20_cifar", "note": EVIL, "url": "https://example.com/w.pth"},
        temperature=None,
        data_summary={
            "counts": {
                "train": {"cat": 300, EVIL: 20, "a & b": 100},
                "val": {"cat": 20, EVIL: 20, "a & b": 20},
            },
            "skipped": [
                ("bad/broken.jpg", "cannot identify image file"),
                {"path": "x.gif", "reason": EVIL},
            ],
            "duplicates": dups,
        },
        explain=explain,
        split="val",
    )
    return data, calls


def test_report_has_every_section_and_is_self_contained(synthetic, tmp_path: Path) -> None:
    data, calls = synthetic
    out = write_report(tmp_path / "run", data)
    assert out == tmp_path / "run" / "report.html"
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # one file, nothing beside it
    text = out.read_text(encoding="utf-8")
    doc = _parse(text)

    assert [i for i in doc.ids if i in SECTION_IDS] == list(SECTION_IDS)
    # Offline: every image is inline data, every link an anchor in the page; nothing runs.
    assert doc.links and all(u.startswith(("data:image/", "#")) for u in doc.links)
    assert doc.scripts == 0
    assert "@import" not in text and "url(" not in text
    csp = [m["content"] for m in doc.meta if m.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]
    # User strings are escaped wherever they appear (title, class, config, paths, reasons).
    assert "<script" not in text
    assert text.count("&lt;script&gt;") >= 6
    assert "a &amp; b" in text

    for uris in doc.images.values():
        for uri in uris:
            assert _decode(uri).width > 10
    assert len(doc.images["curves"]) == 1
    assert len(doc.images["confusion"]) == 1
    assert len(doc.images["calibration"]) == 1


def test_report_content(synthetic, tmp_path: Path) -> None:
    data, calls = synthetic
    text = write_report(tmp_path / "r.html", data).read_text(encoding="utf-8")
    doc = _parse(text)
    y_pred = data.logits.argmax(1)
    wrong = np.flatnonzero(y_pred != data.y_true)
    n_shown = min(TOP_WRONG, len(wrong))
    assert len(wrong) > TOP_WRONG  # the fixture makes enough mistakes to need a top-12
    # A thumbnail and a Grad-CAM overlay per shown mistake, explained for the predicted class.
    assert len(doc.images["errors"]) == 2 * n_shown
    assert len(calls) == n_shown
    assert all(cls == int(y_pred[data.paths.index(p)]) for p, cls in calls)
    # The first shown is the most confidently wrong one.
    probs = np.exp(data.logits - data.logits.max(1, keepdims=True))
    surest = wrong[np.argmax(probs[wrong, y_pred[wrong]] / probs[wrong].sum(1))]
    assert calls[0][0] == data.paths[surest]

    acc = float((y_pred == data.y_true).mean())
    assert f"{100 * acc:.1f}%" in text
    assert "95% interval" in text
    assert "Balanced accuracy" in text and "macro-F1" in text
    assert "classes are very uneven" in text  # train: 300 vs 20
    assert "cannot identify image file" in text  # skipped file with its reason
    assert "t/x.jpg" in text and "near" in text  # the duplicate
    assert "fitted on these same images" in text  # temperature=None is flagged as optimistic
    assert "ECE" in text and "NLL" in text


def test_eval_only_report_without_paths(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 30)
    logits = rng.normal(size=(30, 4))
    data = ReportData(
        title="eval", class_names=list("abcd"), y_true=y, logits=logits, temperature=1.7
    )
    text = write_report(tmp_path / "e.html", data).read_text(encoding="utf-8")
    doc = _parse(text)
    assert [i for i in doc.ids if i in SECTION_IDS] == list(SECTION_IDS)
    assert "evaluation-only" in text
    assert "errors" not in doc.images  # no paths: no thumbnails, but the mistakes are listed
    assert "T = 1.700" in text and "fitted on the validation set" in text
    with pytest.raises(ValueError, match="logits"):
        write_report(tmp_path / "bad.html", ReportData("x", ["a", "b"], y, logits))


# ---------------------------------------------------------------------------------------------
# A real report: a CIFAR ResNet-20 with a new head on flower photos, rendered by Chromium.

SIDE = 32
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _load(path: Path, side: int) -> Image.Image:
    """The centre square of the photo at ``side`` pixels, as the model sees it."""
    with Image.open(path) as im:
        im.draft("RGB", (side, side))
        im = ImageOps.exif_transpose(im).convert("RGB")
    return ImageOps.fit(im, (side, side), Image.Resampling.BILINEAR)


def _tensor(im: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - MEAN) / STD


def _files(
    root: Path, split: str, classes: list[str], per_class: int
) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted((root / split / c).glob("*.jpg"))[:per_class]
        paths += files
        labels += [k] * len(files)
    return paths, labels


def _real_report(flowers_root: Path, out_dir: Path) -> Path:
    from resfit.models.weights import create_model

    ckpt = need(ASSETS / "resnet-cifar10" / "resnet20-12fca82f.th")
    classes = sorted(p.name for p in (flowers_root / "train").iterdir() if p.is_dir())
    tr_paths, tr_y = _files(flowers_root, "train", classes, 80)
    va_paths, va_y = _files(flowers_root, "val", classes, 40)
    torch.manual_seed(0)
    model = create_model("resnet20_cifar", num_classes=len(classes), weights=ckpt, progress=False)
    model.eval()
    with torch.no_grad():
        feats_tr = model.forward_features(torch.stack([_tensor(_load(p, SIDE)) for p in tr_paths]))
        feats_va = model.forward_features(torch.stack([_tensor(_load(p, SIDE)) for p in va_paths]))
    y_tr, y_va = torch.tensor(tr_y), torch.tensor(va_y)

    # Linear probe on frozen features: seconds on a CPU, and a real history to plot.
    opt = torch.optim.Adam(model.fc.parameters(), lr=0.01)
    history = []
    for epoch in range(1, 9):
        perm = torch.randperm(len(y_tr))
        for i in range(0, len(perm), 32):
            idx = perm[i : i + 32]
            loss = F.cross_entropy(model.fc(feats_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            lt, lv = model.fc(feats_tr), model.fc(feats_va)
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(F.cross_entropy(lt, y_tr)),
                "train_acc": float((lt.argmax(1) == y_tr).float().mean()),
                "val_loss": float(F.cross_entropy(lv, y_va)),
                "val_acc": float((lv.argmax(1) == y_va).float().mean()),
            }
        )
    with torch.no_grad():
        logits = model.fc(feats_va)
    # Temperature from half of val, the report on the other half (as train/eval would split).
    calib = torch.arange(len(y_va)) % 2 == 0
    temperature = fit_temperature(logits[calib], y_va[calib])
    test_idx = torch.nonzero(~calib).flatten().tolist()

    def explain(path: str, cls: int) -> Image.Image:
        cam = grad_cam(model, _tensor(_load(Path(path), SIDE)).unsqueeze(0), cls)
        return overlay_cam(_load(Path(path), 192), cam)

    daisy = {s: sorted((flowers_root / s / "daisy").glob("*.jpg")) for s in ("train", "val")}
    counts = {
        s: {c: len(list((flowers_root / s / c).glob("*.jpg"))) for c in classes}
        for s in ("train", "val")
    }
    data = ReportData(
        title="resnet20_cifar linear probe on flowers5 (32 px)",
        class_names=classes,
        y_true=y_va[test_idx].numpy(),
        logits=logits[test_idx].numpy(),
        paths=[str(va_paths[i]) for i in test_idx],
        history=history,
        config={
            "arch": "resnet20_cifar",
            "weights": str(ckpt.name),
            "input_size": SIDE,
            "epochs": 8,
            "lr": 0.01,
        },
        temperature=temperature,
        data_summary={
            "counts": counts,
            "skipped": [],
            "duplicates": find_duplicates(daisy),
            "notes": ["Duplicate scan limited to the daisy class in this example."],
        },
        explain=explain,
        split="val (held-out half)",
    )
    return write_report(out_dir, data)


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


@pytest.mark.shared
def test_real_report_renders_in_chromium(flowers_root: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        message = f"needs {CHROMIUM} for the render check (apt-get install chromium)"
        if os.environ.get("RESFIT_REQUIRE_CHROMIUM"):  # set by .ci/run, which installs it
            pytest.fail(message)
        pytest.skip(message)
    start = time.perf_counter()
    report = _real_report(flowers_root, tmp_path / "run")
    built = time.perf_counter() - start

    doc = _parse(report.read_text(encoding="utf-8"))
    assert len(doc.images["errors"]) == 2 * TOP_WRONG  # a weak 32 px probe makes many mistakes

    shot = tmp_path / "report.png"
    base = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    url = report.resolve().as_uri()
    r = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1280,4000", url],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 4000)
        # Rendered content, not a blank page: many distinct colours.
        assert len(im.convert("RGB").resize((320, 1000)).getcolors(1 << 20)) > 500

    r = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = _parse(r.stdout)
    assert set(SECTION_IDS) <= set(dom.ids)
    assert built < 60, f"building the real report took {built:.0f}s"


# ---------------------------------------------------------------------------------------------
# Issue 13: absent splits (defect 14), odd file names (defect 1), a temperature kept only when
# it helps (defect 10)


def _small(tmp_path: Path, **kw) -> ReportData:
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 20)
    logits = rng.normal(0, 1, (40, 2)) + 1.5 * np.eye(2)[y]
    return ReportData("run", ["ants", "bees"], y, logits, temperature=1.3, **kw)


def _warnings(text: str) -> list[str]:
    return [w.split("</p>")[0] for w in text.split('<p class="warn">&#9888; ')[1:]]


def test_no_test_split_gives_no_missing_class_warning(tmp_path: Path) -> None:
    counts = {
        "train": {"ants": 100, "bees": 90},
        "val": {"ants": 20, "bees": 20},
        "test": {"ants": 0, "bees": 0},  # what DataSplits.counts() gives with no test split
    }
    text = write_report(
        tmp_path / "a.html", _small(tmp_path, data_summary={"counts": counts})
    ).read_text(encoding="utf-8")
    assert not [w for w in _warnings(text) if "no images for" in w]
    assert "<th>test</th>" not in text and "<th>val</th>" in text  # no column for it either

    counts["test"] = {"ants": 5, "bees": 0}  # a test split that lacks a class is worth a word
    text = write_report(
        tmp_path / "b.html", _small(tmp_path, data_summary={"counts": counts})
    ).read_text(encoding="utf-8")
    assert [w for w in _warnings(text) if "no images for" in w] == ["test: no images for bees"] * 2


def test_odd_file_names_are_shown_not_fatal(tmp_path: Path) -> None:
    odd = os.fsdecode(b"caf\xe9.png")  # not UTF-8: Python holds it as 'caf\udce9.png'
    folder = tmp_path / os.fsdecode(b"d\xe9j\xe0")
    folder.mkdir()
    data = _small(tmp_path)
    y_pred = data.logits.argmax(1)
    paths = []
    for i in range(len(data.y_true)):
        p = folder / (odd if i == int(np.flatnonzero(y_pred != data.y_true)[0]) else f"{i}.png")
        Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(p)
        paths.append(str(p))
    data.paths = paths
    data.class_names = ["ants", os.fsdecode(b"abeill\xe9s")]
    data.title = f"resnet on {folder.name}"
    data.config = {"data": str(folder), "out": str(tmp_path / "run")}
    data.data_summary = {
        "skipped": [(str(folder / odd), "cannot identify image file")],
        "duplicates": [Duplicate("train", folder / odd, "val", Path("v.png"), "exact", 0)],
    }
    out = write_report(tmp_path / "r.html", data)
    text = out.read_bytes().decode("utf-8")  # valid UTF-8
    assert "\udce9" not in text and "caf\\xe9.png" in text and "abeill\\xe9s" in text
    assert text.count("d\\xe9j\\xe0") >= 4  # title, config, skipped file, duplicate
    assert len(_parse(text).images["errors"]) >= 1  # the odd file still has its thumbnail


def test_report_keeps_t_1_when_fitting_here_would_raise_the_ece(tmp_path: Path) -> None:
    logits = np.zeros((20, 2))
    logits[:16, 0], logits[16:, 1] = 2.2, 2.2  # right at 90 %
    logits[18:, 1] = 8.0  # two confident mistakes pull the NLL fit to T ~ 3.8
    y = np.array([0] * 16 + [1] * 2 + [0] * 2)
    text = write_report(
        tmp_path / "c.html", ReportData("run", ["ants", "bees"], y, logits)
    ).read_text(encoding="utf-8")
    assert "Temperature 1.000: the fitted T = 3.8" in text and "kept T = 1" in text
    assert "after (T = 1.000)" in text

"""Image embeddings and similar-image search (resfit.inference.embed), on real flower photos with the
CIFAR ResNet-56 checkpoint (served from a local mirror as a registered weight)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resfit.core.errors import ConfigError, DataError
from resfit.inference.embed import Embedder, embed_batch, load_embeddings, save_embeddings, search

from .conftest import FLOWERS_ZIP, need


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """300 flowers5 validation photos, each with its mirror image and a 3/4-size JPEG copy."""
    need(FLOWERS_ZIP)
    root = tmp_path_factory.mktemp("embed")
    out: dict[str, list[Path]] = {"orig": [], "mirror": [], "resized": []}
    with zipfile.ZipFile(FLOWERS_ZIP) as z:
        names = [n for n in sorted(z.namelist()) if n.startswith("val/") and n.endswith(".jpg")]
        for i, name in enumerate(names[::2][:300]):
            orig = root / "db" / f"{i:04d}.jpg"
            orig.parent.mkdir(exist_ok=True)
            orig.write_bytes(z.read(name))
            im = Image.open(orig).convert("RGB")
            small = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.BICUBIC)
            for kind, copy, suffix in (
                ("mirror", im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), ".png"),
                ("resized", small, ".jpg"),
            ):
                p = root / kind / f"{i:04d}{suffix}"
                p.parent.mkdir(exist_ok=True)
                copy.save(p, **({"quality": 90} if suffix == ".jpg" else {}))
                out[kind].append(p)
            out["orig"].append(orig)
    return out


@pytest.fixture()
def embedder(cifar_mirror: Path) -> Embedder:
    return Embedder.from_weights("resnet56_cifar", "resnet56_cifar.cifar10", device="cpu")


def test_embed_batch_is_unit_fp32_features() -> None:
    import torch

    from resfit.models.adapters import adapt
    from resfit.models.resnet import build_model

    torch.manual_seed(0)
    model = build_model("resnet20_cifar", num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    emb = embed_batch(model, x)
    assert emb.dtype == torch.float32 and emb.shape == (3, adapt(model).num_features)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    with torch.no_grad():
        want = torch.nn.functional.normalize(adapt(model).features(x), dim=1)
    assert torch.allclose(emb, want, atol=1e-5)


@pytest.mark.parametrize("flip", [True, False])
def test_mirror_and_resized_copies_find_their_photo(embedder: Embedder, photos, flip) -> None:
    embedder.flip = flip
    paths, db, skipped = embedder.embed(photos["orig"])
    assert not skipped and len(paths) == len(photos["orig"])
    names = [Path(p).stem for p in paths]
    for kind in ("mirror", "resized"):
        q_paths, q, _ = embedder.embed(photos[kind])
        _, idx = search(db, q, k=1)
        hit = np.mean([names[i] == Path(p).stem for i, p in zip(idx[:, 0], q_paths, strict=True)])
        print(f"flip={flip} {kind}: nearest neighbour is the photo in {hit:.1%} of {len(q)}")
        if flip or kind == "resized":  # without flip a mirror image is not the same vector
            assert hit >= 0.9, f"{kind}: {hit:.1%}"


def test_index_search_equals_brute_force(embedder: Embedder, photos, tmp_path: Path) -> None:
    _, db, _ = embedder.embed(photos["orig"])
    _, q, _ = embedder.embed(photos["mirror"][:50])
    brute = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :10]
    _, exact = search(db, q, k=10)
    _, hnsw = search(db, q, k=10, exact_below=0, index_path=tmp_path / "db.hnsw")
    assert (tmp_path / "db.hnsw").is_file()
    _, reloaded = search(db, q, k=10, exact_below=0, index_path=tmp_path / "db.hnsw")
    for got in (exact, hnsw, reloaded):
        assert np.array_equal(got, brute)


def test_npz_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((4, 8)).astype(np.float32)
    names = ["a.jpg", "dir/b c.png", "caf\u00e9.jpg", "odd\udcff.jpg"]  # last: not UTF-8 bytes
    model = {"arch": "resnet20_cifar", "weights": "x.th", "sha256": "ab"}
    save_embeddings(tmp_path / "e.npz", names, emb, model)
    paths, got, got_model = load_embeddings(tmp_path / "e.npz")
    assert paths == names and got_model == model
    assert got.dtype == np.float32 and np.array_equal(got, emb)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"not a zip", "not a readable npz"),
        ("missing", "has no embeddings, model"),
    ],
)
def test_bad_npz_is_one_clear_line(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "e.npz"
    if content == "missing":
        np.savez(path, paths=np.array(["a"]))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        load_embeddings(path)
    assert "\n" not in str(e.value)


def _cli(argv: list[str]) -> int:
    from resfit.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def test_cli_embed_and_similar(cifar_mirror: Path, photos, tmp_path: Path, capsys) -> None:
    out = tmp_path / "db.npz"
    w = ["--arch", "resnet56_cifar", "--weights", "resnet56_cifar.cifar10", "--device", "cpu"]
    db_dir = str(photos["orig"][0].parent)
    assert _cli(["embed", *w, db_dir, "--out", str(out)]) == 0
    paths, emb, model = load_embeddings(out)
    assert len(paths) == len(photos["orig"]) and model["arch"] == "resnet56_cifar"
    capsys.readouterr()
    assert _cli(["similar", str(out), str(photos["mirror"][0]), "3", "--k", "2"]) == 0
    rows = [r.split(",") for r in capsys.readouterr().out.strip().splitlines()]
    assert rows[0] == ["query", "rank", "path", "similarity"] and len(rows) == 5
    _, want = search(emb, emb[3:4], k=3)
    assert [r[2] for r in rows if r[0] == paths[3]] == [paths[i] for i in want[0][1:3]]


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (["similar", "{npz}", "99", "--k", "3"], ConfigError, "holds rows 0 to 1"),
        (["similar", "{npz}", "0", "--k", "0"], ConfigError, "--k must be at least 1"),
        (["similar", "{npz}", "nothing-here.jpg"], DataError, "no such file"),
        (["embed", "--arch", "resnet20_cifar", "x.jpg", "--out", "o.npz"], ConfigError, "go together"),
        (["embed", "{npz}", "--out", "o.npz"], ConfigError, "give the images"),
    ],
)  # fmt: skip
def test_cli_bad_inputs_one_line(tmp_path: Path, argv, error, message) -> None:
    npz = tmp_path / "e.npz"
    save_embeddings(npz, ["a.jpg", "b.jpg"], np.eye(2, 4, dtype=np.float32), {"arch": "x"})
    with pytest.raises(error, match=message) as e:
        _cli([a.replace("{npz}", str(npz)) for a in argv])
    assert "\n" not in str(e.value)


def test_parsers_import_no_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from resfit.cli import build_parser; "
        "build_parser().parse_args(['similar', 'x.npz', '1']); "
        "print('torch' in sys.modules or 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""The inference-engine seam: a registry picks the runtime, every engine gives fp32 CPU logits,
and the import graph runs one way (export builds on inference and engines, never back)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

import resfit
from resfit.inference.predictor import Predictor

from .test_inference import CLASSES, make_run

SRC = Path(resfit.__file__).parent  # the sources of the package under test


def _imported_parts(path: Path) -> set[str]:
    """resfit parts (core, inference, export, ...) a file imports anywhere, inside functions
    too (a lazy import is still an edge of the graph)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(path.parent.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 2:
            found.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("resfit."):
            found.add(node.module.split(".")[1])
    return found


def test_export_builds_on_inference_and_never_the_reverse() -> None:
    for path in (SRC / "inference").glob("*.py"):
        assert "export" not in _imported_parts(path), path.name
    assert "inference" in _imported_parts(SRC / "export" / "run.py")


def test_registry_lists_engines_and_refuses_an_unknown_one(tmp_path) -> None:
    from resfit.core.errors import ConfigError
    from resfit.inference.engines import available_engines, create_engine

    names = available_engines()
    assert names[0] == "torch"
    # (tensorrt is registered now: its own test says what installing it takes)
    with pytest.raises(ConfigError, match=r"'tvm' is not an inference engine.*torch"):
        create_engine("tvm", tmp_path, None)
    with pytest.raises(ConfigError, match="available: torch"):
        Predictor.from_run(make_run(tmp_path), engine="tvm")


class _Fixed:
    """An engine that always answers the last class: proves Predictor asks the registry."""

    name, precision, device = "fixed", "fp32", torch.device("cpu")

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.calls = run_dir, 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = torch.zeros(len(batch), len(CLASSES), dtype=torch.float64)
        logits[:, -1] = 5.0
        return logits.float()

    def describe(self) -> str:
        return "always the last class"


@pytest.fixture()
def fixed_engine():
    from resfit.inference import engines

    made: list[_Fixed] = []

    def factory(run_dir, model, *, device, precision, compile, **options):
        made.append(_Fixed(run_dir))
        return made[-1]

    engines.register_engine("fixed", factory)
    try:
        yield made
    finally:
        engines.ENGINES.remove("fixed")


def test_a_registered_engine_serves_predictor(tmp_path, fixed_engine) -> None:
    from resfit.inference.engines import Engine, available_engines

    from .images import make_colour_folder

    data = make_colour_folder(tmp_path / "data", per_class=2, splits=("",))
    run = make_run(tmp_path)
    assert "fixed" in available_engines()
    p = Predictor.from_run(run, engine="fixed")
    preds, _ = p.predict([data], top_k=2)
    (engine,) = fixed_engine
    assert isinstance(p.engine, Engine) and p.engine is engine and engine.run_dir == run
    assert engine.calls == 1 and [x.label for x in preds] == [CLASSES[-1]] * 6


def test_torch_engine_gives_fp32_cpu_logits_of_the_model(tmp_path) -> None:
    from resfit.core.errors import ConfigError
    from resfit.inference.engines import create_engine
    from resfit.inference.predictor import load_run_model

    model, _, _ = load_run_model(make_run(tmp_path))
    engine = create_engine("torch", None, model, device="cpu", precision="fp32")
    x = torch.randn(5, 3, 16, 16)
    got = engine(x)
    with torch.no_grad():
        want = model(x)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # BN folded: same function
    assert engine.name == "torch" and engine.precision == "fp32" and "CPU" in engine.describe()
    with pytest.raises(ConfigError, match="--engine onnx"):
        create_engine("torch", None, model, precision="int8")


def test_onnx_engine_runs_the_exported_run_like_torch(tmp_path) -> None:
    pytest.importorskip("onnxruntime", reason="the optional export extra is not installed")
    from resfit.core.errors import ConfigError, RunError
    from resfit.export.run import export_run

    run = make_run(tmp_path)
    with pytest.raises(RunError, match="resfit export"):
        Predictor.from_run(run, engine="onnx")
    export_run(run, opset=17)
    onnx = Predictor.from_run(run, engine="onnx", threads=1)
    torch_ = Predictor.from_run(run, device="cpu", precision="fp32")
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(onnx.engine(x), torch_.engine(x), rtol=0, atol=1e-4)
    assert onnx.engine.name == "onnx" and onnx.precision == "fp32" and onnx.device.type == "cpu"
    for bad in (dict(precision="bf16"), dict(compile=True), dict(device="cuda")):
        with pytest.raises(ConfigError):
            Predictor.from_run(run, engine="onnx", **bad)
    with pytest.raises(RunError, match=r"--int8 --calib DATA"):
        Predictor.from_run(run, engine="onnx", precision="int8")


def test_missing_onnxruntime_names_the_extra(monkeypatch, tmp_path) -> None:
    from resfit.core.errors import MissingExtraError
    from resfit.inference.engines import available_engines, create_engine

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert "onnx" not in available_engines()
    with pytest.raises(MissingExtraError, match=r"pip install 'resfit\[export\]'") as e:
        create_engine("onnx", make_run(tmp_path), None)
    assert (e.value.package, e.value.extra) == ("onnxruntime", "export")


def test_help_answers_in_less_than_half_the_time_of_importing_torch() -> None:
    """Issue 18, item 4: ``resfit --help`` imports no torch, so it beats ``import torch``
    alone by far (Zen 4: 0.08 s against 1.9 s); the median of 3 fresh processes each."""
    import statistics
    import subprocess
    import sys
    import time

    def seconds(*args: str) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([sys.executable, *args], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    help_s, torch_s = seconds("-m", "resfit", "--help"), seconds("-c", "import torch")
    assert help_s < 0.5 * torch_s, f"resfit --help {help_s:.2f} s, import torch {torch_s:.2f} s"


def test_a_feature_score_costs_one_forward_pass_per_batch(tmp_path) -> None:
    """vim (serve's default score) reads features and logits: the PyTorch engine gives both
    from one pass, and the score is that of the fp32 model's features."""
    import numpy as np
    from torch.nn.modules.module import register_module_forward_hook

    from resfit.data.datasets import DecodedImages
    from resfit.inference.trust import Trust
    from resfit.inference.unknown import fit_detector
    from resfit.models.adapters import adapt

    run = make_run(tmp_path)
    plain = Predictor.from_run(run, engine="torch", device="cpu", precision="bf16")
    head = adapt(plain.model).head
    rng = np.random.default_rng(0)
    det = fit_detector(rng.normal(size=(40, head.in_features)), np.arange(40) % len(CLASSES),
                       head.weight.detach().numpy(), head.bias.detach().numpy(), "vim")  # fmt: skip
    p = Predictor.from_run(run, engine="torch", device="cpu", precision="bf16")
    p.trust = Trust(det)
    n = 6
    imgs = [torch.randint(0, 256, (3, 18, 18), dtype=torch.uint8) for _ in range(n)]
    decoded = DecodedImages(imgs, torch.full((n,), -1), [Path("")] * n, [], p.base_size)
    stems = []  # the first convolution runs once per forward pass of any copy of the model
    hook = register_module_forward_hook(
        lambda m, i, o: stems.append(1) if getattr(m, "in_channels", 0) == 3 else None
    )
    try:
        probs = p.scored_probabilities(decoded, batch_size=3)
    finally:
        hook.remove()
    assert len(stems) == 2 and probs.shape == (n, len(CLASSES) + 1)  # 2 batches, one pass each
    # The score is the fp32 model's, whatever the engine's precision.
    x = torch.stack([p.transform(img) for img in imgs])
    with torch.no_grad():
        feats = adapt(p.model).features(x)
        want = det.score(feats.numpy(), head(feats).numpy())
    np.testing.assert_allclose(probs[:, -1].numpy(), want, rtol=1e-4, atol=1e-4)

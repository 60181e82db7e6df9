"""The TensorRT engine (issue 18, part 2): one line with the install command where it cannot
run, the ``--engine auto`` rule on a GPU, the provider options it builds (engine cache under
RESFIT_CACHE_DIR, fp16/int8 flags, batch profile), the symmetric int8 export TensorRT takes,
and on a CUDA machine with TensorRT installed the real engine against PyTorch."""

from __future__ import annotations

import json
import logging
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import numpy as np
import pytest
import torch

from resfit.cli import main
from resfit.core.errors import ConfigError, MissingExtraError, RunError
from resfit.inference import engines
from resfit.inference import tensorrt as trt
from resfit.inference.engines import choose_engine, create_engine
from resfit.training import train

from .images import make_colour_folder

GPU_READY, WHY_NOT = trt.probe()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """Each test its own cache: engines and exported models never leak between tests."""
    monkeypatch.setenv("RESFIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return make_colour_folder(tmp_path_factory.mktemp("colours"), per_class=12)


@pytest.fixture(scope="module")
def run(tmp_path_factory, colours: Path) -> Path:
    """A trained run: confident answers, so that agreement between engines means something."""
    out = tmp_path_factory.mktemp("runs") / "run"
    train(data=str(colours), out=str(out), arch="resnet20_cifar", img_size=16, epochs=4,
          batch_size=16, lr=0.1, progress=False, report=False, leakage="off")  # fmt: skip
    return out


def _fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    """An importable stand-in for an optional package that is not installed here."""
    module = types.ModuleType(name)
    module.__spec__ = ModuleSpec(name, None)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


# ---------------------------------------------------------------------------------------------
# Where it cannot run: one line, the reason, the install command


def test_engine_tensorrt_without_tensorrt_is_one_line_with_the_install_command(
    run: Path, colours: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not installed, even on a GPU box
    assert "tensorrt" not in engines.available_engines()
    with pytest.raises(MissingExtraError, match=r"pip install 'resfit\[tensorrt\]'"):
        create_engine("tensorrt", run, None)
    image = next(colours.rglob("*.png"))
    assert main(["predict", str(run), str(image), "--engine", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "resfit predict: error: this needs tensorrt: pip install 'resfit[tensorrt]'"
    assert not any("Traceback" in line for line in err)


def test_without_a_gpu_the_reason_is_named(run: Path, monkeypatch) -> None:
    _fake_module(monkeypatch, "tensorrt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trt.probe() == (False, "no CUDA GPU is visible")
    with pytest.raises(ConfigError, match="cannot run here: no CUDA GPU is visible"):
        create_engine("tensorrt", run, None)


def test_the_cpu_onnxruntime_is_told_apart(monkeypatch) -> None:
    ort = _fake_module(monkeypatch, "onnxruntime", __version__="1.32.0",
                       get_available_providers=lambda: ["CPUExecutionProvider"])  # fmt: skip
    assert ort is sys.modules["onnxruntime"]
    _fake_module(monkeypatch, "tensorrt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    usable, why = trt.probe()
    assert not usable
    assert "CPU build" in why and "pip uninstall onnxruntime" in why and "resfit[tensorrt]" in why


def test_bad_options_are_refused_before_any_gpu_work(run: Path, monkeypatch) -> None:
    _fake_module(monkeypatch, "tensorrt")
    for kw, message in [({"precision": "bf16"}, "not --precision bf16"),
                        ({"device": "cpu"}, "NVIDIA GPU"),
                        ({"compile": True}, "--compile is for the torch engine")]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            create_engine("tensorrt", run, None, **kw)


# ---------------------------------------------------------------------------------------------
# --engine auto on a GPU


@pytest.fixture()
def on_cuda(monkeypatch):
    """choose_engine sees a CUDA device; the test sets what the TensorRT probe answers."""
    monkeypatch.setattr(engines.runtime, "pick_device", lambda device: torch.device("cuda"))

    def probe_says(usable: bool, why: str) -> None:
        monkeypatch.setattr(trt, "probe", lambda: (usable, why))

    return probe_says


def test_auto_picks_tensorrt_on_cuda_when_it_can_run(run: Path, on_cuda) -> None:
    on_cuda(True, "TensorRT 10.16 through ONNX Runtime 1.31.1")
    name, why = choose_engine(run)
    assert name == "tensorrt" and "TensorRT 10.16" in why
    assert choose_engine(run, precision="fp32")[0] == "tensorrt"
    assert choose_engine(run, compile=True)[0] == "torch"  # --compile is PyTorch's
    assert choose_engine(run, precision="bf16")[0] == "torch"


def test_auto_falls_back_to_torch_on_cuda_and_says_why(run: Path, on_cuda) -> None:
    on_cuda(False, "TensorRT is not installed (pip install 'resfit[tensorrt]')")
    name, why = choose_engine(run)
    assert name == "torch"
    assert "TensorRT is not usable" in why and "resfit[tensorrt]" in why


def test_auto_int8_on_cuda_needs_the_tensorrt_export(run: Path, on_cuda, tmp_path) -> None:
    on_cuda(True, "TensorRT 10.16")
    with pytest.raises(RunError, match="--format tensorrt --int8 --calib DATA"):
        choose_engine(run, precision="int8")
    copy = tmp_path / "run-int8"
    (copy / "export" / "tensorrt").mkdir(parents=True)
    (copy / "export" / "tensorrt" / "model.int8.onnx").write_bytes(b"onnx")
    assert choose_engine(copy, precision="int8")[0] == "tensorrt"
    on_cuda(False, "no CUDA GPU is visible")
    with pytest.raises(RunError, match="no CUDA GPU is visible"):
        choose_engine(copy, precision="int8")


def test_auto_falls_back_with_one_log_line_when_the_engine_fails(
    run: Path, monkeypatch, caplog
) -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    monkeypatch.setattr(engines, "choose_engine", lambda *a, **k: ("tensorrt", "a CUDA GPU"))

    def broken(*a, **k):
        raise RunError("ONNX Runtime could not start TensorRT for model.onnx")

    monkeypatch.setattr(trt, "make_tensorrt", broken)
    _fake_module(monkeypatch, "tensorrt")
    with caplog.at_level(logging.INFO, logger="resfit"):
        engine = create_engine("auto", run, model, device="cpu")
    assert engine.name == "torch"
    fell = [r.getMessage() for r in caplog.records if "TensorRT failed here" in r.getMessage()]
    assert fell == ["engine: torch (TensorRT failed here: ONNX Runtime could not start "
                    "TensorRT for model.onnx)"]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The options the engine gives ONNX Runtime


def test_provider_options_for_each_precision(tmp_path: Path) -> None:
    opts = trt.provider_options("fp16", input_shape=(3, 224, 224), max_batch=32,
                                engine_cache=tmp_path / "e", timing_cache=tmp_path / "t")  # fmt: skip
    assert opts["trt_fp16_enable"] == "True" and opts["trt_int8_enable"] == "False"
    assert opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == str(tmp_path / "e")
    assert opts["trt_timing_cache_path"] == str(tmp_path / "t")
    assert opts["trt_profile_min_shapes"] == "input:1x3x224x224"
    assert opts["trt_profile_max_shapes"] == opts["trt_profile_opt_shapes"] == "input:32x3x224x224"
    int8 = trt.provider_options("int8", input_shape=(1, 32, 32))
    assert int8["trt_int8_enable"] == int8["trt_fp16_enable"] == "True"
    assert int8["trt_engine_cache_enable"] == "False" and "trt_engine_cache_path" not in int8
    fp32 = trt.provider_options("fp32", input_shape=(3, 32, 32))
    assert fp32["trt_fp16_enable"] == fp32["trt_int8_enable"] == "False"
    with pytest.raises(ConfigError, match="not --precision bf16"):
        trt.provider_options("bf16", input_shape=(3, 32, 32))


class _FakeSession:
    """Records what the engine asks ONNX Runtime for; answers logits of the right shape."""

    made: list[dict] = []

    def __init__(self, path, options, providers) -> None:
        self.path, self.providers, self.calls = path, providers, []
        _FakeSession.made.append({"path": path, "providers": providers})

    def get_providers(self) -> list[str]:
        return [trt.PROVIDER, "CUDAExecutionProvider"]

    def get_inputs(self):
        return [types.SimpleNamespace(name="input")]

    def get_outputs(self):
        return [types.SimpleNamespace(name="logits")]

    def run(self, names, feeds):
        x = feeds["input"]
        self.calls.append(len(x))
        return [np.tile(x.reshape(len(x), -1)[:, :1], (1, 4)).astype(np.float32)]


@pytest.fixture()
def fake_gpu(monkeypatch):
    """ONNX Runtime with the TensorRT provider and a CUDA device, as far as the engine can
    tell: what it builds is recorded in _FakeSession.made."""
    _FakeSession.made = []
    _fake_module(monkeypatch, "tensorrt")
    _fake_module(monkeypatch, "onnxruntime", __version__="1.31.1", InferenceSession=_FakeSession,
                 SessionOptions=types.SimpleNamespace,
                 get_available_providers=lambda: [trt.PROVIDER, "CPUExecutionProvider"])  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trt, "load_tensorrt_libraries", lambda: None)
    return _FakeSession.made


def test_the_engine_caches_under_resfit_cache_dir_and_splits_large_batches(
    run: Path, fake_gpu, own_cache: Path
) -> None:
    (run / "export").mkdir(exist_ok=True)
    onnx = run / "export" / "model.onnx"
    onnx.write_bytes(b"an onnx file")
    try:
        engine = create_engine("tensorrt", run, None, max_batch=32)
        (made,) = fake_gpu
        assert made["path"] == str(onnx)
        (name, opts), (fallback, _) = made["providers"]
        assert (name, fallback) == (trt.PROVIDER, "CUDAExecutionProvider")
        cache = Path(opts["trt_engine_cache_path"])
        assert cache.is_dir() and cache.parent == own_cache / "tensorrt" / "engines"
        assert Path(opts["trt_timing_cache_path"]) == own_cache / "tensorrt" / "timing"
        assert opts["trt_fp16_enable"] == "True" and engine.precision == "fp16"  # auto: fp16
        assert opts["trt_profile_max_shapes"] == "input:32x3x16x16"
        out = engine(torch.randn(70, 3, 16, 16))
        assert out.shape == (70, 4) and out.dtype == torch.float32
        assert engine.session.calls == [32, 32, 6]
        # Another file content, another engine folder: a stale engine is never reused.
        onnx.write_bytes(b"another onnx file")
        create_engine("tensorrt", run, None, max_batch=32)
        assert fake_gpu[1]["providers"][0][1]["trt_engine_cache_path"] != str(cache)
    finally:
        onnx.unlink()


def test_int8_runs_the_symmetric_export_and_says_how_to_make_it(run: Path, fake_gpu) -> None:
    with pytest.raises(RunError, match=r"--format tensorrt --int8 --calib DATA"):
        create_engine("tensorrt", run, None, precision="int8")
    target = run / "export" / "tensorrt" / "model.int8.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"qdq")
    try:
        engine = create_engine("tensorrt", run, None, precision="int8")
        assert fake_gpu[-1]["path"] == str(target)
        assert fake_gpu[-1]["providers"][0][1]["trt_int8_enable"] == "True"
        assert engine.precision == "int8"
    finally:
        target.unlink()


# ---------------------------------------------------------------------------------------------
# The int8 file TensorRT takes (runs on the CPU: ONNX Runtime quantizes and checks it)


def test_export_format_tensorrt_writes_symmetric_int8_and_says_why_checks_skipped(
    run: Path, colours: Path, tmp_path: Path
) -> None:
    onnx = pytest.importorskip("onnx", reason="needs resfit[export]")
    from onnx import numpy_helper

    from resfit.export.run import export_run

    out = tmp_path / "export"
    info = export_run(run, int8=True, calib=colours / "train", val=colours / "val", out=out,
                      format="tensorrt")  # fmt: skip
    path = out / "tensorrt" / "model.int8.onnx"
    assert info["tensorrt_int8"] == str(path) and not (out / "model.int8.onnx").exists()
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    zero_points = [numpy_helper.to_array(inits[n.input[2]])
                   for n in proto.graph.node if n.op_type == "QuantizeLinear"]  # fmt: skip
    assert zero_points  # activations are quantized ...
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)  # ... int8, zero point 0
    assert info["max_abs_logit_diff"] < 1e-3
    assert abs(info["int8_accuracy_change"]) <= 0.1 and info["top1_agreement"] >= 0.85
    saved = json.loads((out / "export.json").read_text())
    if not GPU_READY:
        assert saved["tensorrt_check"] == f"skipped: {WHY_NOT}"


# ---------------------------------------------------------------------------------------------
# The real engine, on a CUDA machine with TensorRT (bench/gpu_check.sh runs these)


@pytest.mark.skipif(not GPU_READY, reason=f"TensorRT cannot run here: {WHY_NOT}")
def test_real_engine_agrees_with_pytorch(run: Path, colours: Path, own_cache: Path) -> None:
    from resfit.inference.predictor import Predictor

    torch_p = Predictor.from_run(run, device="cpu", precision="fp32", engine="torch")
    decoded = torch_p.decode(sorted(colours.rglob("*.png")))
    reference = torch_p.logits(decoded)
    scale = float(reference.abs().max())
    for precision, tol in (("fp32", 0.01), ("fp16", 0.03)):
        p = Predictor.from_run(run, engine="tensorrt", precision=precision)
        assert p.engine.name == "tensorrt" and p.device.type == "cuda"
        logits = p.logits(decoded)
        assert float((logits - reference).abs().max()) <= tol * scale, precision
        agree = float((logits.argmax(1) == reference.argmax(1)).float().mean())
        assert agree >= 0.97, (precision, agree)
        # A batch on the GPU already (bound in place, no host copy) gives the same logits.
        x8 = torch.stack([p.transform(img) for img in decoded.images[:8]])
        torch.testing.assert_close(p.engine(x8.cuda()), p.engine(x8), rtol=1e-5, atol=1e-5)
    engines_dir = own_cache / "tensorrt" / "engines"
    assert any(engines_dir.rglob("*.engine")), "the built engines are kept in the cache"


@pytest.mark.skipif(not GPU_READY, reason=f"TensorRT cannot run here: {WHY_NOT}")
def test_real_int8_engine_keeps_the_answers(run: Path, colours: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="needs the exporter (resfit[tensorrt])")
    from resfit.export.run import export_run

    info = export_run(run, int8=True, calib=colours / "train", val=colours / "val",
                      format="tensorrt")  # fmt: skip
    assert info["tensorrt_check"].startswith("TensorRT"), info["tensorrt_check"]
    assert info["tensorrt_fp16_top1_agreement"] >= 0.97
    assert info["tensorrt_int8_top1_agreement"] >= 0.85
    assert abs(info["tensorrt_int8_accuracy_change"]) <= 0.1
    name, _ = choose_engine(run, precision="int8")
    assert name == "tensorrt"


def test_the_tensorrt_checks_measure_as_the_edge_checks_do(monkeypatch) -> None:
    """export's TensorRT checks and the edge formats' share one metric function (compare):
    the same keys and values for the same logits."""
    from torch import nn

    from resfit.export.edge import compare
    from resfit.export.run import _tensorrt_checks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = [np.random.default_rng(i).normal(size=(4, 3, 2, 2)).astype(np.float32)
               for i in range(2)]  # fmt: skip
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    shift = {"fp32": 0.0, "fp16": 0.01, "int8": 0.5}

    class Engine:  # stands for TensorRT: the model's logits, a little off per precision
        def __init__(self, path, precision, **kw) -> None:
            self.precision = precision

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                out = model(x)
            return out + shift[self.precision] * torch.arange(3.0)

    monkeypatch.setattr(trt, "probe", lambda: (True, "a fake GPU"))
    monkeypatch.setattr(trt, "TensorRtEngine", Engine)
    report = _tensorrt_checks(model, Path("m.onnx"), Path("q.onnx"), batches, labels, (3, 2, 2))
    x = torch.from_numpy(np.concatenate(batches))
    with torch.no_grad():
        ref = model(x).numpy()
    for precision in ("fp32", "fp16", "int8"):
        want = compare(Engine(None, precision)(x).numpy(), ref, labels)
        got = {k.removeprefix(f"tensorrt_{precision}_"): v for k, v in report.items()
               if k.startswith(f"tensorrt_{precision}_")}  # fmt: skip
        assert got == pytest.approx(want), precision
    assert report["tensorrt_int8_max_abs_logit_diff"] == pytest.approx(1.0, abs=1e-5)

"""Inference: load a run folder and predict on new images with the run's own preprocessing.

    predictor = Predictor.from_run("RUN")
    for p in predictor.predict(["a.jpg", "folder/"], top_k=3):
        print(p.path, p.label, p.confidence)

Needs only the run folder (config.json, classes.json, model.safetensors), not the training data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import runtime
from .augmentation import base_size_for, eval_transform, for_channels
from .data import DecodedImages, Sample, TransformedImages, decode_all, find_images, iter_batches
from .models import build_model


class RunError(ValueError):
    """A run folder is missing something or does not match; the message names the file."""


@dataclass
class Prediction:
    path: str
    label: str
    confidence: float
    top_k: list[tuple[str, float]]


def load_run(run: str | os.PathLike) -> tuple[dict, list[str]]:
    """The resolved config and class names of a run folder."""
    run = Path(run)
    for name in ("config.json", "classes.json", "model.safetensors"):
        if not (run / name).is_file():
            raise RunError(
                f"{run} is not a finished resfit run: {name} is missing "
                f"(train one with `resfit train DATA --out {run}`)"
            )
    return json.loads((run / "config.json").read_text()), json.loads(
        (run / "classes.json").read_text()
    )


def load_run_model(run: str | os.PathLike) -> tuple[nn.Module, dict, list[str]]:
    """The trained model of a run (eval mode, CPU), its config and class names."""
    from safetensors.torch import load_file

    cfg, classes = load_run(run)
    model = build_model(cfg["arch"], num_classes=len(classes), in_chans=cfg.get("in_chans", 3))
    state = load_file(str(Path(run) / "model.safetensors"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RunError(
            f"{run}/model.safetensors does not fit {cfg['arch']}: {str(e).splitlines()[0]}"
        ) from None
    return model.eval(), cfg, classes


class Predictor:
    """A trained classifier with its preprocessing, ready for new images."""

    def __init__(
        self,
        model: nn.Module,
        classes: Sequence[str],
        *,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        in_chans: int = 3,
        device: str = "auto",
        precision: str = "auto",
        temperature: float | None = None,
        tta: bool = False,
        compile: bool = False,
    ) -> None:
        self.tta = tta  # test-time augmentation: average the logits of the image and its mirror
        self.device = runtime.pick_device(device)
        self.precision = runtime.pick_precision(self.device, precision)
        if precision == "int8":
            raise ValueError(
                "--precision int8 runs in ONNX Runtime: add --engine onnx (after resfit export --int8)"
            )
        self.onnx = not isinstance(model, nn.Module)
        self.model = (
            model
            if self.onnx
            else model.eval().to(self.device).to(memory_format=torch.channels_last)
        )
        # The fast path for repeated inference: BN folded, channels_last, autocast.
        self._run = (
            model
            if self.onnx
            else runtime.prepare_for_inference(self.model, self.device, self.precision, compile)
        )
        self.classes = list(classes)
        self.img_size = img_size
        self.base_size = base_size_for(img_size)
        self.transform = for_channels(eval_transform(img_size, tuple(mean), tuple(std)), in_chans)
        self.temperature = temperature

    @classmethod
    def from_run(
        cls,
        run: str | os.PathLike,
        *,
        device: str = "auto",
        precision: str = "auto",
        engine: str = "torch",
        tta: bool = False,
        compile: bool = False,
    ) -> Predictor:
        """Load a run. ``engine="onnx"`` runs ``RUN/export/model.onnx`` (or ``model.int8.onnx``
        with ``precision="int8"``) in ONNX Runtime; ``resfit export`` writes them. ``compile``
        adds ``torch.compile`` to the PyTorch engine (its first batch compiles: pays off on
        large folders only)."""
        if compile and engine != "torch":
            raise ValueError("--compile applies to --engine torch, not to ONNX Runtime")
        model, cfg, classes = load_run_model(run)
        if engine == "onnx":
            from .export import OnnxClassifier

            name = "model.int8.onnx" if precision == "int8" else "model.onnx"
            path = Path(run) / "export" / name
            if not path.is_file():
                flag = " --int8 --calib DATA" if precision == "int8" else ""
                raise RunError(f"{path} is missing: run `resfit export {run}{flag}` first")
            model = OnnxClassifier(path)
            device, precision = "cpu", "fp32"
        elif engine != "torch":
            raise ValueError(f"--engine must be torch or onnx, not {engine!r}")
        calib = Path(run) / "calibration.json"
        temperature = json.loads(calib.read_text())["temperature"] if calib.exists() else None
        return cls(
            model,
            classes,
            img_size=cfg["img_size"],
            mean=cfg["mean"],
            std=cfg["std"],
            in_chans=cfg.get("in_chans", 3),
            device=device,
            precision=precision,
            temperature=temperature,
            tta=tta,
            compile=compile,
        )

    def decode(self, paths: Sequence[str | os.PathLike], progress: bool = False) -> DecodedImages:
        return decode_all([Sample(Path(p), -1) for p in paths], self.base_size, progress=progress)

    @torch.inference_mode()
    def logits(self, decoded: DecodedImages, batch_size: int = 64) -> Tensor:
        out = []
        data = TransformedImages(decoded, self.transform)
        n = len(data)
        for x, _ in iter_batches(
            data, [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
        ):
            views = [x, x.flip(-1)] if self.tta else [x]
            logits = [
                torch.from_numpy(self.model(v.numpy())).float()
                if self.onnx
                else self._run(v).float().cpu()
                for v in views
            ]
            out.append(torch.stack(logits).mean(0))
        return torch.cat(out) if out else torch.empty(0, len(self.classes))

    def probabilities(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits / (self.temperature or 1.0), dim=1)

    def predict(
        self,
        inputs: Sequence[str | os.PathLike],
        top_k: int = 1,
        batch_size: int = 64,
        progress: bool = False,
    ) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Predict files, folders (recursively) and globs. Returns the predictions and the
        files that could not be read (path, reason)."""
        from tqdm.auto import tqdm

        paths = find_images([str(p) for p in inputs])
        k = max(1, min(top_k, len(self.classes)))
        size = 4 * batch_size
        chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
        preds: list[Prediction] = []
        skipped: list[tuple[str, str]] = []
        bar = tqdm(total=len(paths), desc="predicting", disable=not progress, leave=False)
        # Decode the next chunk (in threads) while the model runs on this one: decoding keeps
        # up with the model, and a folder of any size never sits in memory whole.
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self.decode, chunks[0]) if chunks else None
            for i in range(len(chunks)):
                decoded = pending.result()
                if i + 1 < len(chunks):
                    pending = pool.submit(self.decode, chunks[i + 1])
                probs = self.probabilities(self.logits(decoded, batch_size))
                conf, idx = probs.topk(k, dim=1)
                preds += [
                    Prediction(
                        str(p),
                        self.classes[int(j[0])],
                        float(c[0]),
                        [(self.classes[int(a)], float(v)) for a, v in zip(j, c, strict=True)],
                    )
                    for p, c, j in zip(decoded.paths, conf, idx, strict=True)
                ]
                skipped += decoded.skipped
                bar.update(len(chunks[i]))
        bar.close()
        return preds, skipped


def write_predictions_csv(
    path: str | os.PathLike | None, preds: Sequence[Prediction], top_k: int
) -> str:
    """CSV with path,label,confidence and, for top_k > 1, label_2,confidence_2,...; returns the
    text (and writes it when ``path`` is given)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    header = ["path", "label", "confidence"]
    for r in range(2, top_k + 1):
        header += [f"label_{r}", f"confidence_{r}"]
    w.writerow(header)
    for p in preds:
        row = [p.path, p.label, f"{p.confidence:.6f}"]
        for lab, c in p.top_k[1:top_k]:
            row += [lab, f"{c:.6f}"]
        w.writerow(row)
    text = buf.getvalue()
    if path:
        Path(path).write_text(text)
    return text


def make_explainer(model: nn.Module, img_size: int, transform, device: torch.device):
    """A Grad-CAM overlay maker for the report: path, class -> PIL image of what the model saw."""
    from torchvision.transforms.v2.functional import center_crop, to_pil_image

    from .data import load_image, resize_shorter, to_tensor
    from .explain import grad_cam, overlay_cam

    def explain(path: str, class_idx: int):
        img = to_tensor(resize_shorter(load_image(path), base_size_for(img_size)))
        x = transform(img)[None].to(device)
        cam = grad_cam(model, x, class_idx)
        shown = to_pil_image(center_crop(img, [img_size, img_size]))
        if img_size < 128:  # thumbnails of tiny inputs are unreadable
            shown = shown.resize((128, 128))
        return overlay_cam(shown, cam)

    return explain

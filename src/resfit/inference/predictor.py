"""Inference: load a run folder and predict on new images with the run's own preprocessing.

    predictor = Predictor.from_run("RUN")  # or engine="onnx", precision="int8"
    preds, skipped = predictor.predict(["a.jpg", "folder/"], top_k=3)
    for p in preds:
        print(p.path, p.label, p.confidence)

Needs only the run folder (config.json, classes.json, model.safetensors; ``export/`` for the
ONNX engine), not the training data. The runtime that computes the logits is an engine from
:mod:`resfit.inference.engines`, picked by name; this module decodes, batches and labels.

File names need not be valid UTF-8 (Linux allows any bytes but ``/``). Python keeps such a
name as a ``str`` with surrogate escapes (PEP 383); resfit passes it through unchanged and
writes its CSVs with :func:`resfit.data.paths.open_csv` (UTF-8, ``errors="surrogateescape"``), so
the path column holds the name's bytes exactly as on disk, what ``ls`` writes to a pipe. Every
other row stays plain UTF-8, and a reader that opens the CSV with ``errors="surrogateescape"``
(pandas: ``encoding_errors="surrogateescape"``) gets a path that opens the file again. Logs and
messages show such a name with ``\\xNN`` escapes (:func:`resfit.data.paths.display_path`).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.atomic import atomic_csv
from ..core.errors import ConfigError, RunError
from ..data.datasets import DecodedImages, TransformedImages, decode_all, iter_batches
from ..data.paths import find_images
from ..data.preprocessing import EvalPreprocessing
from ..data.samples import Sample
from ..models.resnet import build_model
from ..runs import RunPaths, load_run, load_weights, read_temperature, read_thresholds
from ..tasks.base import Task
from ..tasks.multi import MultiLabel
from ..tasks.registry import task_for
from ..tasks.single import SingleLabel
from .engines import Engine, TorchEngine, create_engine
from .explain import make_explainer, make_overlay
from .stagestats import score_features
from .trust import Trust, json_answer

__all__ = [
    "Prediction",
    "Predictor",
    "RunError",
    "load_run",
    "load_run_model",
    "make_explainer",
    "read_thresholds",
    "write_predictions_csv",
]


# What a run's outputs mean when its config names no task (runs from before multi-label).
_TASK = SingleLabel()


@dataclass
class Prediction:
    """One image's answer. Single-label: ``label`` is the top class, ``confidence`` its
    probability, ``top_k`` the best classes. Multi-label: ``labels`` are the classes at or
    above their thresholds with their probabilities (most probable first), ``label`` those
    names joined by ``;`` ("" for none), ``confidence`` the top class's probability, and
    ``probabilities`` every class's."""

    path: str
    label: str
    confidence: float
    top_k: list[tuple[str, float]]
    labels: list[tuple[str, float]] | None = None
    probabilities: dict[str, float] | None = None
    # Where the run has an unknown score (RUN/unknown.json): ``unknown`` is whether the score
    # is over its threshold. ``label`` stays the top class here (check ``unknown``); the CSV
    # writes "" for an unknown image, and ``best_guess`` (the top class) beside it.
    unknown: bool | None = None
    unknown_score: float | None = None
    best_guess: str | None = None
    set: list[str] | None = None  # --conformal: the prediction set, most probable first
    accepted: bool | None = None  # --max-risk: whether the confidence clears its threshold


def load_run_model(run: str | os.PathLike) -> tuple[nn.Module, dict, list[str]]:
    """The trained model of a run (eval mode, CPU), its config and class names."""
    cfg, classes = load_run(run)
    model = build_model(cfg["arch"], num_classes=len(classes), in_chans=cfg.get("in_chans", 3))
    state = load_weights(run)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RunError(
            f"{RunPaths(run).model} does not fit {cfg['arch']}: {str(e).splitlines()[0]}"
        ) from None
    return model.eval(), cfg, classes


def run_preprocessing(run: str | os.PathLike, cfg: Mapping[str, Any]) -> EvalPreprocessing:
    """The preprocessing a run's ``config.json`` records; a bad value names the file."""
    try:
        return EvalPreprocessing.from_config(cfg)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise RunError(f"{RunPaths(run).config}: {e}") from None


class Predictor:
    """A trained classifier with its preprocessing, ready for new images.

    ``model`` is the PyTorch model (kept for Grad-CAM and export); the logits come from
    ``engine``: a registered engine name (see :func:`resfit.inference.engines.available_engines`),
    created for ``run_dir`` and ``model``, or a ready :class:`~resfit.inference.engines.Engine`.
    ``resize_size`` and ``interpolation`` are the weights' evaluation resize (see
    :class:`~resfit.data.augmentation.EvalPreprocessing`).
    """

    def __init__(
        self,
        model: nn.Module,
        classes: Sequence[str],
        *,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        in_chans: int = 3,
        resize_size: int | None = None,
        interpolation: str = "bilinear",
        window: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        temperature: float | Sequence[float] | None = None,
        thresholds: Sequence[float] | None = None,
        task: Task | None = None,
        tta: bool = False,
        compile: bool = False,
        engine: str | Engine = "torch",
        run_dir: str | os.PathLike | None = None,
        engine_options: Mapping[str, Any] | None = None,
        trust: Trust | None = None,
    ) -> None:
        self.preprocessing = EvalPreprocessing(
            img_size, tuple(mean), tuple(std), in_chans, resize_size, interpolation, window
        )
        # The window this run's DICOM/16-bit images decode through (its config.json's): a value
        # of this predictor, so predictors of runs with other windows live side by side.
        self.window = self.preprocessing.window_values
        if isinstance(engine, str):
            engine = create_engine(
                engine,
                run_dir,
                model,
                device=device,
                precision=precision,
                compile=compile,
                **dict(engine_options or {}),
            )
        self.engine: Engine = engine
        self.device: torch.device = engine.device
        self.precision: str = engine.precision
        self.model = model.eval().to(self.device)
        self.classes = list(classes)
        self.img_size = img_size
        self.base_size = self.preprocessing.decode_size  # shorter side images are decoded at
        self.transform = self.preprocessing.eval_transform()
        self.temperature = temperature
        self.task: Task = task or _TASK
        self.multilabel = isinstance(self.task, MultiLabel)  # kept for callers; ask the task
        # Multi-label decisions: p >= threshold, per class (tuned on validation by training).
        self.thresholds = list(thresholds) if thresholds is not None else [0.5] * len(classes)
        self.tta = tta  # test-time augmentation: average the logits of the image and its mirror
        # The unknown score, conformal sets and --max-risk (resfit.inference.trust).
        self.trust: Trust = trust or Trust()

    @classmethod
    def from_run(
        cls,
        run: str | os.PathLike,
        *,
        device: str = "auto",
        precision: str = "auto",
        engine: str = "auto",
        tta: bool = False,
        compile: bool = False,
        conformal: float | None = None,
        max_risk: float | None = None,
        conformal_method: str = "aps",
        unknown_folder: str | os.PathLike | None = None,
        false_accept: float = 0.05,
        **engine_options: Any,
    ) -> Predictor:
        """Load a run. ``engine="auto"`` picks the fastest installed engine here
        (:func:`resfit.inference.engines.choose_engine`); ``engine="onnx"`` runs ``RUN/export/model.onnx`` (or ``model.int8.onnx``
        with ``precision="int8"``) in ONNX Runtime; ``resfit export`` writes them. ``compile``
        adds ``torch.compile`` to the PyTorch engine (its first batch compiles: pays off on
        large folders only). ``engine_options`` go to the engine (onnx: ``threads``).
        ``conformal`` (a coverage such as 0.9) adds prediction sets, ``max_risk`` (such as
        0.02) the selective-prediction decision, both calibrated on the run's validation
        images (docs/guide/trust-unknown.md); ``unknown_folder`` (images known to be out of
        scope) moves the unknown threshold to let ``false_accept`` of them through."""
        model, cfg, classes = load_run_model(run)
        task = task_for(cfg)
        trust = Trust.from_run(run).configure(task, conformal=conformal, max_risk=max_risk,
                                              method=conformal_method)  # fmt: skip
        pre = run_preprocessing(run, cfg)
        temperature = read_temperature(run)
        predictor = cls(
            model,
            classes,
            **asdict(pre),
            device=device,
            precision=precision,
            temperature=temperature,
            thresholds=read_thresholds(run, classes),
            task=task,
            tta=tta,
            compile=compile,
            engine=engine,
            run_dir=run,
            engine_options=engine_options,
            trust=trust,
        )
        if unknown_folder is not None:
            predictor.set_unknown_folder(unknown_folder, false_accept)
        return predictor

    def decode(
        self, paths: Sequence[str | os.PathLike], progress: bool = False, *, ready: bool = False
    ) -> DecodedImages:
        """Decode images at the run's decode size; with ``ready`` also crop and normalise them
        in the decoding threads (model inputs, for :meth:`logits` with ``ready=True``)."""
        return decode_all([Sample(Path(p), -1) for p in paths], self.base_size, progress=progress,
                          transform=self.transform if ready else None, window=self.window)  # fmt: skip

    def logits(
        self, decoded: DecodedImages, batch_size: int = 64, *, ready: bool = False
    ) -> Tensor:
        """fp32 logits (N, classes) on the CPU for decoded images, in their order (``ready``:
        images that :meth:`decode` already preprocessed): the same numbers as :meth:`predict`,
        eval and serve give (with a feature-reading unknown score and the PyTorch engine, the
        fp32 pass that also computes the score's features: :meth:`outputs`)."""
        return self.outputs(decoded, batch_size, ready=ready, features=False)[0]

    def unknown_scores(
        self, decoded: DecodedImages, batch_size: int = 64, *, ready: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Logits and the unknown score of each image (higher = less like the training
        data; None for a run without a fitted score): the Python API's score."""
        from ..models.adapters import adapt

        logits, feats = self.outputs(decoded, batch_size, ready=ready)
        if feats is None:
            s = self.trust.scores(None, logits.numpy())
        else:  # the fp32 model's logits from the same features: the same in every engine
            with torch.inference_mode():
                head = adapt(self.model).head
                fp32 = head(feats[:, : head.in_features].to(head.weight.device)).float().cpu()
            s = self.trust.scores(feats.numpy(), fp32.numpy())
        return logits, None if s is None else torch.from_numpy(s)

    @torch.inference_mode()
    def outputs(
        self, decoded: DecodedImages, batch_size: int = 64, *, ready: bool = False,
        features: bool = True,
    ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """Logits and, where the unknown score needs them (and ``features``), the fp32
        features of the PyTorch model (pooled, then the stages' statistics:
        :func:`resfit.inference.stagestats.score_features`): the score does not depend on
        the engine."""
        from ..models.adapters import adapt

        want = features and self.trust.needs_features
        out, feats = [], []
        n = len(decoded)
        if ready:
            batches = ((torch.stack(decoded.images[i : i + batch_size]), None)
                       for i in range(0, n, batch_size))  # fmt: skip
        else:
            data = TransformedImages(decoded, self.transform)
            batches = iter_batches(
                data, [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
            )
        # With the PyTorch engine one fp32 pass of the model gives both: the features, then
        # the logits through its head (the computation the score and the conformal sets were
        # fitted with at training, so an image on a threshold stays on the same side). Other
        # runtimes (ONNX, OpenVINO) give logits only: the features are one more pass.
        # ``joint`` holds whether or not the caller wants the features back, so logits are the
        # same numbers from every method.
        a = adapt(self.model)
        joint = self.trust.needs_features and isinstance(self.engine, TorchEngine)
        for x, _ in batches:
            if want or joint:
                f = score_features(a, x.to(self.device))
                if want:
                    feats.append(f.cpu())
            first = a.head(f[:, : a.num_features]).float().cpu() if joint else self.engine(x)
            views = [first, self.engine(x.flip(-1))] if self.tta else [first]
            out.append(torch.stack(views).mean(0))
        logits = torch.cat(out) if out else torch.empty(0, len(self.classes))
        return logits, (torch.cat(feats) if feats else None) if want else None

    def probabilities(self, logits: Tensor) -> Tensor:
        """Calibrated probabilities: the task's post-processing at the run's temperature(s)."""
        t = self.temperature if self.temperature is not None else 1.0
        return self.task.probabilities(logits, t)

    def answer(self, probs: Tensor, top_k: int = 5) -> dict[str, Any]:
        """One image's answer from its probabilities as JSON, as the task gives it (what
        ``resfit serve`` returns): single-label ``{"label", "confidence", "top_k"}``,
        multi-label ``{"labels", "probabilities"}`` (the labels at or above their
        thresholds, most probable first)."""
        k = max(1, min(top_k, len(self.classes)))
        return self.task.answer(probs, self.classes, k, self.thresholds)

    def set_unknown_folder(self, folder: str | os.PathLike, false_accept: float = 0.05) -> None:
        """Move the unknown threshold so that a fraction ``false_accept`` of the images in
        ``folder`` (known to be out of scope) is accepted; logs their AUROC against the
        validation images."""
        self.trust = self.trust.with_unknown_images(self.unknown_scores, self.decode(
            find_images([str(folder)])), folder, false_accept)  # fmt: skip

    def scored_probabilities(self, decoded: DecodedImages, batch_size: int = 64) -> Tensor:
        """Probabilities (N, classes), with the unknown score as one more column where the
        run has one: what :meth:`answer_row` takes (``resfit serve``'s batches)."""
        logits, scores = self.unknown_scores(decoded, batch_size)
        probs = self.probabilities(logits)
        # float64: a score that rounds across the threshold would flip the flag
        return probs if scores is None else torch.cat([probs.double(), scores[:, None]], 1)

    def answer_row(self, row: Tensor, top_k: int = 5) -> dict[str, Any]:
        """Serve's JSON for one row of :meth:`scored_probabilities`: the task's answer plus
        ``unknown`` and ``score`` (unknown: ``label`` null, ``best_guess`` kept), ``set``
        (``--conformal``) and ``accepted`` (``--max-risk``)."""
        has_score = self.trust.detector is not None
        probs = row[:-1].float() if has_score else row
        scores = row[-1:].double().numpy() if has_score else None
        extra = self.trust.fields(probs[None].numpy(), scores, self.classes)[0]
        return json_answer(self.task, self.answer(probs, top_k), extra)

    def _label(
        self, decoded: DecodedImages, batch_size: int, k: int, ready: bool = False
    ) -> list[Prediction]:
        logits, scores = self.unknown_scores(decoded, batch_size, ready=ready)
        probs = self.probabilities(logits)
        answers = self.task.answers(probs, self.classes, k, self.thresholds)
        extras = self.trust.fields(probs.numpy(), None if scores is None else scores.numpy(),
                                   self.classes)  # fmt: skip
        preds = []
        for p, a, extra in zip(decoded.paths, answers, extras, strict=True):
            pred = Prediction(str(p), *a, **extra)
            if pred.unknown is not None:
                pred.best_guess = pred.label
            preds.append(pred)
        return preds

    def predict(
        self,
        inputs: Sequence[str | os.PathLike],
        top_k: int = 1,
        batch_size: int = 64,
        progress: bool = False,
    ) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """Predict files, folders (recursively) and globs. Returns the predictions and the
        files that could not be read (path, reason)."""
        from ..core.progress import progress_bar

        paths = find_images([str(p) for p in inputs])
        k = max(1, min(top_k, len(self.classes)))
        size = 4 * batch_size
        chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
        preds: list[Prediction] = []
        skipped: list[tuple[str, str]] = []
        bar = progress_bar(total=len(paths), desc="predicting", enabled=progress)
        # Decode, crop and normalise the next chunk (in threads) while the model runs on this
        # one: decoding keeps up with the model, and a folder of any size never sits in memory
        # whole.
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self.decode, chunks[0], ready=True) if chunks else None
            for i in range(len(chunks)):
                decoded = pending.result()
                if i + 1 < len(chunks):
                    pending = pool.submit(self.decode, chunks[i + 1], ready=True)
                preds += self._label(decoded, batch_size, k, ready=True)
                skipped += decoded.skipped
                bar.update(len(chunks[i]))
        bar.close()
        return preds, skipped

    def explainer(self) -> Callable:
        """A Grad-CAM overlay maker (path, class index -> PIL image) with this preprocessing."""
        return make_explainer(
            self.model,
            self.img_size,
            self.transform,
            self.device,
            base_size=self.base_size,
            window=self.window,
        )

    def overlayer(self) -> Callable:
        """A Grad-CAM overlay maker for decoded images (uint8 (3, H, W) at ``base_size``,
        class index or None -> PIL image): what ``resfit serve``'s ``/v1/explain`` draws."""
        return make_overlay(self.model, self.img_size, self.transform, self.device)


def write_predictions_csv(
    path: str | os.PathLike | None, preds: Sequence[Prediction], top_k: int
) -> str:
    """CSV with path,label,confidence and, for top_k > 1, label_2,confidence_2,...; returns the
    text (and writes it when ``path`` is given). Multi-label predictions: path,labels (those
    at or above their thresholds, joined by ``;``) and a probability column per class.

    A file name that is not valid UTF-8 is written as its bytes on disk (surrogateescape, see
    the module doc), so one odd name never costs the other rows. Whoever prints the returned
    text should encode it the same way: ``text.encode("utf-8", "surrogateescape")``.
    """
    buf = io.StringIO()
    w = csv.writer(buf)
    if preds and preds[0].probabilities is not None:
        classes = list(preds[0].probabilities)
        w.writerow(["path", "labels", *classes])
        for p in preds:
            probs = p.probabilities or {}
            w.writerow([p.path, p.label, *(f"{probs[c]:.6f}" for c in classes)])
        return _write_text(path, buf.getvalue())
    header = ["path", "label", "confidence"]
    for r in range(2, top_k + 1):
        header += [f"label_{r}", f"confidence_{r}"]
    extra = _trust_columns(preds)
    w.writerow(header + [name for name, _ in extra])
    for p in preds:
        row = [p.path, "" if p.unknown else p.label, f"{p.confidence:.6f}"]
        for lab, c in p.top_k[1:top_k]:
            row += [lab, f"{c:.6f}"]
        w.writerow(row + [cell(p) for _, cell in extra])
    return _write_text(path, buf.getvalue())


def _trust_columns(preds: Sequence[Prediction]) -> list[tuple[str, Callable]]:
    """The unknown / set / accepted columns that these predictions carry (none for a run
    without them): ``unknown`` true/false, ``unknown_score``, ``best_guess``, ``set`` (labels
    joined by ``;``), ``accepted`` true/false."""
    if not preds:
        return []
    first, cols = preds[0], []
    if first.unknown is not None:
        cols += [("unknown", lambda p: str(p.unknown).lower()),
                 ("unknown_score", lambda p: f"{p.unknown_score:.6f}"),
                 ("best_guess", lambda p: p.best_guess)]  # fmt: skip
    if first.set is not None:
        cols.append(("set", lambda p: ";".join(p.set or [])))
    if first.accepted is not None:
        cols.append(("accepted", lambda p: str(p.accepted).lower()))
    return cols


def _write_text(path: str | os.PathLike | None, text: str) -> str:
    if path:
        with atomic_csv(path) as f:
            f.write(text)
    return text

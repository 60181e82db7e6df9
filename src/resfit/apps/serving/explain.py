"""``/v1/explain``: Grad-CAM overlays for the service's images, drawn on its model thread.

The class explained is the one asked for (``?class=NAME``) or the one ``/v1/predict`` answers
for the same image: its probabilities come from the same engine and calibration, so the page
shows the overlay of the label it shows. Grad-CAM itself needs gradients, so it runs on the
run's PyTorch model (:meth:`resfit.inference.predictor.Predictor.overlayer`) whatever engine
serves the predictions.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence

from torch import Tensor

from ...inference.predictor import Predictor

__all__ = ["class_index", "data_url", "overlay_runner"]


def class_index(classes: Sequence[str], name: str | None) -> int | None:
    """The index of the class ``name`` (None: the predicted one); ValueError naming the
    run's classes when it knows no such class."""
    if name is None:
        return None
    if name not in classes:
        shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
        raise ValueError(f"class={name!r}: this run knows {shown}")
    return list(classes).index(name)


def overlay_runner(
    predictor: Predictor, probabilities: Callable[[list[Tensor]], Tensor]
) -> Callable[[list[tuple]], list[tuple[str, bytes]]]:
    """The batcher's ``explain`` function: (decoded image, class index or None) pairs ->
    (class name, PNG bytes of the overlay) each. ``probabilities`` is the batcher's own, so an
    unnamed class is the service's top class."""
    made: list[Callable] = []  # the overlay maker, built at the first request (torchvision)

    def run(items: list[tuple]) -> list[tuple[str, bytes]]:
        if not made:
            made.append(predictor.overlayer())
        unnamed = [i for i, (_, idx) in enumerate(items) if idx is None]
        top: dict[int, int] = {}
        if unnamed:  # one forward pass for the whole batch, not one per image
            probs = probabilities([items[i][0] for i in unnamed])
            # The class columns only: a run with an unknown score answers it as one more.
            n = len(predictor.classes)
            top = {i: int(p[:n].argmax()) for i, p in zip(unnamed, probs, strict=True)}
        out = []
        for i, (img, idx) in enumerate(items):
            idx = top.get(i, idx)
            buf = io.BytesIO()
            made[0](img, idx).save(buf, format="PNG")
            out.append((predictor.classes[idx], buf.getvalue()))
        return out

    return run


def data_url(png: bytes) -> str:
    """A PNG as a ``data:`` URL, ready for an ``<img src>`` (the page shows it as is)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")

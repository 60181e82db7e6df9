"""A Triton Inference Server model repository for an exported ONNX classifier.

    write_triton_repository("RUN/export/model.onnx", "RUN/export/triton", "flowers",
                            classes=["daisy", ...])

writes, in Triton's layout::

    triton/flowers/config.pbtxt   # onnxruntime backend, dynamic batching, label file
    triton/flowers/labels.txt     # one class per line, for Triton's classification extension
    triton/flowers/1/model.onnx   # version 1: the model itself

Serve it with ``tritonserver --model-repository RUN/export/triton``. The input is the model's
preprocessed float32 batch (``input``, C x H x W; the batch axis is Triton's), the output its
``logits``; the preprocessing (resize, crop, mean and std) stays with the client and is in the
ONNX file's ``resfit`` metadata. Written with the standard library only; the ONNX file is read
with ``onnx`` for its input and output shapes.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..core.atomic import atomic_dir
from ..core.errors import ConfigError, ExportError, MissingExtraError

__all__ = ["triton_config", "write_triton_repository"]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _preferred(max_batch: int) -> list[int]:
    """Powers of two from 4 up to ``max_batch`` (and ``max_batch`` itself)."""
    sizes = [b for b in (4, 8, 16, 32, 64, 128, 256) if b < max_batch]
    return [*sizes, max_batch]


def triton_config(
    name: str,
    input_dims: Sequence[int],
    num_classes: int,
    *,
    max_batch: int = 32,
    max_queue_delay_us: int = 5000,
    instances: int = 1,
    kind: str = "KIND_CPU",
    input_name: str = "input",
    output_name: str = "logits",
) -> str:
    """The ``config.pbtxt`` text for an ONNX classifier with dynamic batching.

    ``input_dims`` is C, H, W (without the batch axis: ``max_batch_size`` adds it). Requests
    wait up to ``max_queue_delay_us`` to be batched with others, up to ``max_batch``.
    """
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be at least 1, got {max_batch}")
    if max_queue_delay_us < 0:
        raise ConfigError(f"the queue delay must be >= 0 microseconds, got {max_queue_delay_us}")
    if kind not in ("KIND_CPU", "KIND_GPU"):
        raise ConfigError(f"instance kind must be KIND_CPU or KIND_GPU, got {kind!r}")
    dims = ", ".join(str(int(d)) for d in input_dims)
    preferred = ", ".join(str(b) for b in _preferred(max_batch))
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [
  {{
    name: "{input_name}"
    data_type: TYPE_FP32
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "{output_name}"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [
  {{
    count: {instances}
    kind: {kind}
  }}
]
"""


def _onnx_io(path: Path) -> tuple[str, list[int], str, int]:
    """Input name, its C/H/W dims, output name and class count of an ONNX classifier."""
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("onnx", "export") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    inp, out = graph.input[0], graph.output[0]
    in_dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
    if len(in_dims) != 4 or not all(in_dims[1:]) or len(out_dims) != 2 or not out_dims[1]:
        raise ExportError(
            f"{path}: expected an N x C x H x W input and N x classes output with fixed sizes, "
            f"got {in_dims} -> {out_dims}"
        )
    return inp.name, in_dims[1:], out.name, out_dims[1]


def label_line(name: str) -> str:
    """A class name as one line of ``labels.txt`` (Triton reads the file line by line): valid
    UTF-8 whatever the name (undecodable bytes as ``\\xNN``, as the CSVs and logs show them),
    and a line break in it escaped, so it cannot shift the labels after it."""
    from ..data.paths import display_text

    return display_text(name).replace("\r", "\\r").replace("\n", "\\n")


def write_triton_repository(
    onnx_path: str | os.PathLike,
    repository: str | os.PathLike,
    name: str,
    *,
    classes: Sequence[str],
    max_batch: int = 32,
    max_queue_delay_us: int = 5000,
    instances: int = 1,
    kind: str = "KIND_CPU",
) -> Path:
    """Write model ``name`` (version 1) into the Triton model repository ``repository``.

    Returns the model's folder. An existing model of that name is replaced.
    """
    if not _NAME.match(name):
        raise ConfigError(
            f"Triton model name {name!r}: use letters, digits, '_', '-' and '.' "
            f"(pass another with --name)"
        )
    onnx_path = Path(onnx_path)
    in_name, dims, out_name, n = _onnx_io(onnx_path)
    if len(classes) != n:
        raise ExportError(f"{onnx_path} has {n} outputs but {len(classes)} class names")
    config = triton_config(
        name, dims, n, max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
        instances=instances, kind=kind, input_name=in_name, output_name=out_name,
    )  # fmt: skip
    model_dir = Path(repository) / name
    # Built beside the target and renamed into place: Triton polling the repository never
    # sees a half-written model.
    with atomic_dir(model_dir) as tmp:
        (tmp / "1").mkdir()
        shutil.copyfile(onnx_path, tmp / "1" / "model.onnx")
        (tmp / "labels.txt").write_text("".join(f"{label_line(c)}\n" for c in classes),
                                        encoding="utf-8")  # fmt: skip
        (tmp / "config.pbtxt").write_text(config, encoding="utf-8")
    return model_dir

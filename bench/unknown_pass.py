"""A feature score's forward passes (vim, serve's default): now one fp32 pass of the model
for the features and the logits through its head (``Predictor.outputs`` with the PyTorch
engine), against the path before it, the engine's pass for the logits plus the model's fp32
pass for the features. Also the engine's pass alone (a run without a feature score).

Model: torchvision-layout ResNet-50 (random weights: the speed does not depend on them) at
224 px, batch 16 of real flowers5 photos (random input without ../shared), the PyTorch
engine at ``--precision auto`` (bf16 on a CPU with AVX512_BF16); median of 5 after a warm-up.

    flock /work/cpu.lock python bench/unknown_pass.py

Last figures (2-core AMD EPYC Zen 4 with AVX512_BF16, shared, under /work/cpu.lock; torch
2.14.1; the engine at bf16, BN folded, channels-last; batch 16 at 224 px; medians of 5):

    engine pass alone (no feature score):    431.8 ms
    before: engine + fp32 features pass:    1359.3 ms
    now: one fp32 pass (features+logits):    913.3 ms
    speed-up now vs before: x1.49

(A feature score still costs ~2.1x the bf16 engine pass alone: the one pass is fp32, the
computation the threshold and the conformal sets were fitted with. The BN-folded copy at fp32
measured 1291 ms against 1806 ms in a noisier run, and put images on a threshold on either
side depending on the batch size.)
"""

from __future__ import annotations

import torch
from _common import flowers_batch

from resfit.apps.benchmark.common import machine_summary, median_time
from resfit.inference.engines import TorchEngine
from resfit.models.adapters import adapt
from resfit.models.weights import create_model


def main() -> None:
    torch.manual_seed(0)
    model = create_model("resnet50").eval()
    batch = flowers_batch(16)
    x = torch.from_numpy(batch) if batch is not None else torch.randn(16, 3, 224, 224)
    engine = TorchEngine(model, device="cpu", precision="auto")

    def before() -> None:  # the path before: two passes
        engine(x)
        with torch.inference_mode():
            adapt(model).features(x).float()

    def now() -> None:  # one pass: the features, then the head
        with torch.inference_mode():
            a = adapt(model)
            a.head(a.features(x).float()).float()

    print(machine_summary())
    print(f"engine: {engine.describe()}; batch {len(x)} at 224 px")
    t_engine = median_time(lambda: engine(x), repeats=5)
    t_before = median_time(before, repeats=5)
    t_now = median_time(now, repeats=5)
    print(f"engine pass alone (no feature score): {t_engine.median * 1000:8.1f} ms")
    print(f"before: engine + fp32 features pass:  {t_before.median * 1000:8.1f} ms")
    print(f"now: one fp32 pass (features+logits): {t_now.median * 1000:8.1f} ms")
    print(f"speed-up now vs before: x{t_before.median / t_now.median:.2f}")


if __name__ == "__main__":
    main()

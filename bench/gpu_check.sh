#!/usr/bin/env bash
# The TensorRT check on an NVIDIA GPU machine, in one go (about 5-8 minutes on an H100):
#   (a) installs what --engine tensorrt needs where it is missing: onnxruntime-gpu 1.31 (CUDA 13,
#       TensorRT 10) and tensorrt-cu13 10.x, into a folder of their own put first on PYTHONPATH
#       (the machine's CPU onnxruntime stays installed, shadowed), from PyPI or, without a
#       network, from the wheels in $WHEELS (default .whl/);
#   (b) runs tests/test_tensorrt.py (the real-engine tests skip, with the reason, where TensorRT
#       cannot run: the summary shows them);
#   (c) runs `resfit bench inference --device cuda` (ResNet-50, 224 px, batch 32): torchvision
#       eager fp32 (the baseline), resfit's PyTorch engines and TensorRT fp32/fp16/int8 rows,
#       each against the baseline in the same run, then prints those rows.
#
#     bash bench/gpu_check.sh            # from the repository root; python3 is the one with torch
#     PYTHON=/path/python WHEELS=/dir bash bench/gpu_check.sh
#
# Wheels for a machine without a network (Python 3.12 there; about 2 GB, so carry them where
# they fit), made where pip reaches PyPI:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform \
#     manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl onnxruntime-gpu==1.31.1 \
#     tensorrt-cu13==10.16.1.11 tensorrt-cu13-libs==10.16.1.11 tensorrt-cu13-bindings==10.16.1.11
#
# Everything it writes goes to $OUT (default /tmp/resfit-gpu-check): log, bench.json, cache.
# Last figures: none yet (written on a machine without a GPU; the lead's run fills them in).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/resfit-gpu-check}
WHEELS=${WHEELS:-.whl}
SITE="$OUT/site"
TRT_VERSION=10.16.1.11
mkdir -p "$OUT" "$SITE"
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export RESFIT_CACHE_DIR="$OUT/cache"
exec > >(tee "$OUT/log") 2>&1

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
$PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| CUDA', torch.version.cuda, '| GPU visible:', torch.cuda.is_available())"

echo "== (a) packages"
has_trt_ort() { $PY -c "import onnxruntime as o, sys
sys.exit('TensorrtExecutionProvider' not in o.get_available_providers())" 2>/dev/null; }
has_trt_libs() { $PY -c "import tensorrt, tensorrt_libs" 2>/dev/null; }
want=()
has_trt_ort || want+=("onnxruntime-gpu==1.31.1")
has_trt_libs || want+=("tensorrt-cu13==$TRT_VERSION" "tensorrt-cu13-libs==$TRT_VERSION"
                       "tensorrt-cu13-bindings==$TRT_VERSION")
if [ ${#want[@]} -gt 0 ]; then
    echo "installing into $SITE: ${want[*]}"
    # --no-deps: their needs (numpy, protobuf, flatbuffers, CUDA 13 runtime) come with torch's
    # image; pulling them again into a folder first on the path could shadow torch's own.
    from=(); [ -d "$WHEELS" ] && from=(--no-index --find-links "$WHEELS")
    timeout 300 $PY -m pip install -q --no-deps --no-compile --target "$SITE" "${from[@]}" \
        "${want[@]}" || echo "could not install ${want[*]} (no network and no wheels in $WHEELS?)"
fi
$PY -c "from resfit.tensorrt_engine import probe; ok, why = probe()
print('TensorRT usable here:' if ok else 'TensorRT NOT usable here:', why)"

echo "== (b) tests/test_tensorrt.py"
timeout 240 $PY -m pytest -q -p no:cacheprovider -rs tests/test_tensorrt.py 2>&1 | tail -25

echo "== (c) resfit bench inference --device cuda"
timeout 420 $PY -m resfit bench inference --device cuda --repeats 5 --json "$OUT/bench.json" \
    > "$OUT/bench.txt" 2>&1 || echo "bench failed (exit $?): tail of its output:"
tail -40 "$OUT/bench.txt"

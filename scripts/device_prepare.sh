#!/usr/bin/env bash
# Prepare the GPU check (benchmarks/device_check.py) for the `device` tool, here, before asking
# for a machine: the first 1,000 CIFAR-10 test images as .device/test1000.npz (the CIFAR-10 root
# stays on this machine; 3 MB travels), the test split's own files for audits there (30 MB), and,
# in .whl/, Python 3.12 wheels of what the device's
# image lacks (fastapi, pydantic & co. for the service section; pyautoattack's code, for the
# audits, as plain files in .device/site).
# Both folders are ignored through .git/info/exclude, never committed. Then, one `run` call
# (docs/BENCHMARKS.md, "CUDA"):
#
#   carry: [".device", ".whl"], timeout_s: 560, command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/.device/site:$PWD PYTHONUNBUFFERED=1 \
#     || exit; python3 benchmarks/device_check.py --out $OUT --images .device/test1000.npz
#
# Audits of the exported campaign models on the GPU (docs/TRAINING.md, "Audits on a GPU"):
#   carry: [".device"], timeout_s: 560, command:
#   export PYTHONPATH=$PWD/.device/site:$PWD DEQGUARD_DATA_DIR=$PWD/.device PYTHONUNBUFFERED=1;
#   PY=python3 DEVICE=cuda BATCH=256 SUFFIX=-cuda WORKERS=8 EXPORT=0 timeout 480 scripts/campaign_finish.sh;
#   pkill -f 'deqguard.cli audit'; sleep 3; tar czf $OUT/audits-cuda.tgz docs/audits/*-cuda
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for d in /.device/ /.whl/; do
    grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
mkdir -p .device .whl
# the test split itself (30 MB), for audits on the GPU (DEQGUARD_DATA_DIR=.device there)
src=$("$PY" -c "from deqguard.data import BATCH_DIR, resolve_data_root; print(resolve_data_root() / BATCH_DIR)")
mkdir -p .device/cifar-10-batches-py
cp "$src/test_batch" "$src/batches.meta" .device/cifar-10-batches-py/
"$PY" - <<'PYEOF'
import numpy as np
from deqguard.data import load_test
split = load_test(n=1000)
np.savez_compressed(".device/test1000.npz", images=split.images.numpy(), labels=split.labels.numpy())
print("wrote .device/test1000.npz", tuple(split.images.shape))
PYEOF
# the versions this checkout's .venv runs (pip freeze), for CPython 3.12 on x86-64 Linux
PKGS=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv
      annotated-types typing-inspection python-multipart)
pins=()
for p in "${PKGS[@]}"; do
    v=$("$PY" -m pip show "$p" 2>/dev/null | awk '/^Version:/ {print $2}')
    [ -n "$v" ] || { echo "$p is not installed in .venv" >&2; exit 1; }
    pins+=("$p==$v")
done
rm -f .whl/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
# pyautoattack is pure Python, but its wheel carries a 44 MB example model: only the package's
# code travels, as plain files on the path
site=$("$PY" -c "import pyautoattack, pathlib; print(pathlib.Path(pyautoattack.__file__).parent)")
rm -rf .device/site && mkdir -p .device/site
cp -r "$site" .device/site/ && rm -rf .device/site/pyautoattack/examples .device/site/pyautoattack/__pycache__
ls -la .whl .device
du -sh .whl .device

#!/usr/bin/env bash
# Wheels for a GPU machine without a package registry, e.g. a stock CUDA PyTorch image
# (torch, torchvision, numpy, rich, PyYAML already there; DeepSpeed not): DeepSpeed, built
# here into a pure-Python wheel (its CUDA ops compile on first use there), its small
# pure-Python needs and timm, at the versions of this checkout's .venv (the tested ones),
# for the GPU machine's Python. With --dali, NVIDIA DALI and its codecs too (~280 MB).
#
#   bash launch/offline_wheels.sh DIR [--python 3.12] [--dali]
#   # then, on the GPU machine, from the repository root:
#   python -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
OUT=${1:?usage: offline_wheels.sh DIR [--python X.Y] [--dali]}
shift
TARGET_PY=3.12
DALI=0
while [ $# -gt 0 ]; do
    case "$1" in
        --python) TARGET_PY=${2:?--python needs a version such as 3.12}; shift 2 ;;
        --dali) DALI=1; shift ;;
        *) echo "offline_wheels.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
PY=${VENV:-.venv}/bin/python
[ -x "$PY" ] || { echo "offline_wheels.sh: no $PY: run make setup first" >&2; exit 2; }

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p "$OUT"
PIP="$PY -m pip --disable-pip-version-check"
# For another Python than this one: binary wheels only, for that version and manylinux.
FOR_TARGET="--only-binary=:all: --python-version $TARGET_PY --platform manylinux2014_x86_64
            --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64"
pins=""
for pkg in hjson pydantic pydantic-core annotated-types typing-inspection timm; do
    pins="$pins $pkg==$(version $pkg)"
done
# shellcheck disable=SC2086  (word splitting of the option and pin lists is meant)
$PIP download -q --no-deps $FOR_TARGET -d "$OUT" $pins

# DeepSpeed ships as a source archive; its build imports torch, so it builds in this venv.
ds=$(version deepspeed)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$PIP download -q --no-deps --no-binary=deepspeed -d "$tmp" "deepspeed==$ds"
$PIP wheel -q --no-deps --no-build-isolation -w "$OUT" "$tmp"/deepspeed-*.tar.gz

if [ "$DALI" = 1 ]; then
    # shellcheck disable=SC2086
    $PIP download -q $FOR_TARGET -d "$OUT" nvidia-dali-cuda130
fi
echo "[offline_wheels] $(ls "$OUT" | wc -l) wheel(s) in $OUT:"
ls -1 "$OUT"

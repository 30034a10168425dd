#!/usr/bin/env bash
# Creates the virtual environment and installs dmt with everything it uses.
# CPU machines get the CPU build of torch (a plain `pip install torch` would pull
# several GB of CUDA wheels); GPU machines get the registry's CUDA build.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip wheel setuptools

# The torchvision stub that only a CPU torch needs (written below).
STUB="$($VENV/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/dmt_cpu_torchvision.pth"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] GPU found: installing CUDA torch"
    $PIP install -q torch torchvision
    rm -f "$STUB"  # a venv first set up on a CPU machine
else
    echo "[setup] no GPU: installing the CPU build of torch 2.13.0"
    # torchvision 0.28.0 pins torch 2.13.0 exactly, so the CPU torch stays in place.
    $PIP install -q torch==2.13.0 torchvision==0.28.0
    # That torchvision wheel is a CUDA build: with the CPU torch, `import torchvision` (and
    # so timm) fails unless one module is stubbed first. dmt's __init__ does it; this .pth
    # does it at interpreter start-up, so a script that imports timm before dmt works too.
    echo 'import sys, types; sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))' \
        > "$STUB"
fi

# FFCV compiles against libturbojpeg and OpenCV; install them when we may.
ffcv_extra=",ffcv"
if ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing FFCV's system libraries (libturbojpeg, OpenCV)"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            libturbojpeg0-dev libopencv-dev pkg-config >/dev/null
    else
        echo "[setup] WARNING: libturbojpeg/OpenCV missing and no root: skipping FFCV"
        ffcv_extra=""
    fi
fi

$PIP install -q -e ".[dev,demo,dali${ffcv_extra}]"
echo "[setup] done: $($VENV/bin/python -c 'import dmt, torch, deepspeed, timm; print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "timm", timm.__version__)')"

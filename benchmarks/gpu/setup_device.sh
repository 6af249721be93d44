#!/usr/bin/env bash
# Source this on the GPU machine (no internet): installs the carried wheels (.whl/, from
# ../shared/device/wheels.sh) and fmsaccel itself, editable, so entry points and the CLI exist.
#   source benchmarks/gpu/setup_device.sh
# a warm machine (a later call within its idle window) keeps /tmp: the same wheels are not installed twice
WHEELS_STAMP=$(stat -c "%n %s" .whl/*.whl | md5sum | cut -c1-32)  # names and sizes
if [ "$(cat /tmp/site/.wheels-stamp 2>/dev/null)" != "$WHEELS_STAMP" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  echo "$WHEELS_STAMP" > /tmp/site/.wheels-stamp
else
  echo "wheels already installed in /tmp/site (warm machine)"
fi
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/pip-e.log 2>&1 || { cat /tmp/pip-e.log; return 1; }
export PATH=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export FMSACCEL_CACHE=${FMSACCEL_CACHE:-/tmp/fmsaccel-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, trl, peft, bitsandbytes, triton; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__, "bnb", bitsandbytes.__version__, "triton", triton.__version__)'

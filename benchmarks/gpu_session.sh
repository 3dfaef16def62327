#!/usr/bin/env bash
# Issue 32's GPU rows as ONE short command for a lent device machine (docs/scaling.md "The recover step,
# kernel by kernel"): the eager and the compiled recover step of the four ImageNet teachers at batch 100,
# bf16 + channels_last, under torch.cuda.set_sync_debug_mode("error"), into the `gpu` entry of
# benchmarks/results/recover_step.json, copied to $OUT with the log.
#
# The device image has torch, torchvision, timm, transformers, accelerate, huggingface_hub, pyarrow, pandas,
# but not `datasets` and two of its needs: they travel as wheels in .whl (ignored by git).
#   here, once:   echo /.whl/ >> .git/info/exclude; bash benchmarks/gpu_session.sh --download
#   on the device (the `device` tool's run, carry [".whl"], timeout_s 600):
#                 bash benchmarks/gpu_session.sh
# then copy the returned recover_step.json over benchmarks/results/recover_step.json and quote it in
# docs/scaling.md and docs/results.md.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--download" ]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "datasets>=4.0,<5" "dill>=0.3.0,<0.4.1" "multiprocess<0.70.19"
  exit $?
fi

OUT="${OUT:-/tmp/gpu_session_out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu_session.log"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT/gpu_session.log"

# 1. the eager step (a minute or two), then 2. the compiled step of G-VBSM (inductor's compilation of the four
# teachers takes most of it; bounded so that the whole command ends inside the device tool's 10 minutes)
python3 benchmarks/recover_step.py --gpu --variant after 2>&1 | tee -a "$OUT/gpu_session.log"
cp benchmarks/results/recover_step.json "$OUT/recover_step.json"
timeout 420 python3 benchmarks/recover_step.py --gpu --variant after_compiled --methods gvbsm 2>&1 \
  | tee -a "$OUT/gpu_session.log"
cp benchmarks/results/recover_step.json "$OUT/recover_step.json"

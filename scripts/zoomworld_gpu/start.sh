#!/usr/bin/env bash
# Start a long ZoomWorld training run on a lent GPU machine in its own process session, so that it outlives
# the 10-minute limit of one device command; follow it with follow.sh (call again within the machine's warm
# window, or the machine and the run are gone). Wheels for packages the machine lacks travel in .whl/.
#
#   bash scripts/zoomworld_gpu/start.sh            # settings below, each overridable by the environment
#   INIT=benchmarks/zoomworld/default/model SECONDS_BUDGET=1500 LR=3e-4 bash scripts/zoomworld_gpu/start.sh
set -euo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch, transformers, accelerate, peft, pydantic; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
RUN=${RUN:-/tmp/zwrun}
INIT=${INIT:-benchmarks/zoomworld/default/model}
SECONDS_BUDGET=${SECONDS_BUDGET:-880}   # training time; the plan fits the cosine schedule into it
mkdir -p "$RUN"
setsid nohup python3 -m benchmarks.zoomworld.train --out "$RUN/out" ${INIT:+--init "$INIT"} --seed "${SEED:-4}" \
  --batch-size "${BATCH:-64}" --lr "${LR:-3e-4}" --num-workers "${WORKERS:-15}" \
  --budgets "${BUDGETS:-64,128,256,576,1024,1024}" --crop-p "${CROP_P:-0.3}" \
  --plan-seconds "$SECONDS_BUDGET" --max-seconds "$((SECONDS_BUDGET + 20))" > "$RUN/log.txt" 2>&1 < /dev/null &
echo "started: $RUN/log.txt"

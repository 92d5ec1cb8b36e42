#!/usr/bin/env bash
# Start a long ZoomWorld training run on a lent GPU machine in its own process session, so that it outlives
# the 10-minute limit of one device command; follow it with follow.sh (call again within the machine's warm
# window, or the machine and the run are gone). Wheels for packages the machine lacks travel in .whl/.
#
#   bash scripts/zoomworld_gpu/start.sh            # settings below, each overridable by the environment
#   INIT=benchmarks/zoomworld/default/model SECONDS_BUDGET=1500 LR=3e-4 bash scripts/zoomworld_gpu/start.sh
# With several GPUs (NPROC, default: all visible) it runs one process per GPU under torchrun (DDP; only the
# multi-process path on CPU is tested here, never on GPUs).
set -euo pipefail
source "$(dirname "$0")/env.sh"
export PYTHONUNBUFFERED=1
# several GPUs: NVLink multicast stays off (the lent machines require it; set here too in case the image's
# environment is not inherited)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import torch, transformers, accelerate, peft, pydantic; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else \"cpu\")"
RUN=${RUN:-/tmp/zwrun}
INIT=${INIT:-benchmarks/zoomworld/default/model}
SECONDS_BUDGET=${SECONDS_BUDGET:-880}   # training time; the plan fits the cosine schedule into it
NPROC=${NPROC:-$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")}
mkdir -p "$RUN"
if [ "$NPROC" -gt 1 ]; then
  # one process per GPU; the plan probe measures one process, so the steps are given: run 9 (2 H200s, 15
  # workers each) took 0.38 s a step of 2 x 64 (the time budget stops a slower run, schedule unfinished)
  launch=(torchrun --nproc_per_node "$NPROC" -m qzoom_adapters.benchmarks.zoomworld.train --steps "${STEPS:-$((SECONDS_BUDGET * 100 / 38))}")
  WORKERS=${WORKERS:-$(( ($(nproc) - NPROC) / NPROC ))}
else
  launch=(python3 -m qzoom_adapters.benchmarks.zoomworld.train --plan-seconds "$SECONDS_BUDGET")
fi
setsid nohup "${launch[@]}" --out "$RUN/out" ${INIT:+--init "$INIT"} --seed "${SEED:-4}" \
  --batch-size "${BATCH:-64}" --lr "${LR:-3e-4}" --num-workers "${WORKERS:-15}" \
  --budgets "${BUDGETS:-64,128,256,576,1024,1024}" --crop-p "${CROP_P:-0.3}" \
  --max-seconds "$((SECONDS_BUDGET + 20))" > "$RUN/log.txt" 2>&1 < /dev/null &
echo "started: $RUN/log.txt"

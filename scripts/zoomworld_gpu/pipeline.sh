#!/usr/bin/env bash
# The whole ZoomWorld default on one lent GPU machine, in its own process session (it outlives the 10-minute
# limit of one device command): train the base model (continuing INIT), then the Q-Zoom chain through the
# recipes (`qzoom_adapters.benchmarks.zoomworld.chain`: heads, stage-1 labels + twig, stage-3 labels + gate, thresholds on
# validation), then pack the results for follow.sh. Wheels for packages the machine lacks travel in .whl/.
#
#   SECONDS_BUDGET=1050 bash scripts/zoomworld_gpu/pipeline.sh      # then: bash scripts/zoomworld_gpu/follow.sh 560
#   SKIP_TRAIN=1 MODEL=/tmp/zwrun/out/model bash scripts/zoomworld_gpu/pipeline.sh   # the chain only
set -euo pipefail
source "$(dirname "$0")/env.sh"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import torch, transformers, accelerate, peft, pydantic; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else \"cpu\")"
RUN=${RUN:-/tmp/zwrun}
INIT=${INIT:-benchmarks/zoomworld/default/model}
SECONDS_BUDGET=${SECONDS_BUDGET:-1050}
MODEL=${MODEL:-$RUN/out/model}
mkdir -p "$RUN"
train=(python3 -m qzoom_adapters.benchmarks.zoomworld.train --plan-seconds "$SECONDS_BUDGET" --out "$RUN/out" --init "$INIT"
       --seed "${SEED:-5}" --batch-size "${BATCH:-64}" --lr "${LR:-3e-4}" --num-workers "${WORKERS:-14}"
       --budgets "${BUDGETS:-64,128,256,576,1024,1024}" --crop-p "${CROP_P:-0.3}"
       --bind-weight "${BIND_WEIGHT:-0}" --roi-p "${ROI_P:-0}"
       --max-seconds "$((SECONDS_BUDGET + 20))")
chain=(python3 -m qzoom_adapters.benchmarks.zoomworld.chain --model "$MODEL" --out "$RUN/chain" --n "${N:-256}"
       --n-gate "${N_GATE:-400}" --n-val "${N_VAL:-96}")
pack="mkdir -p $RUN/pack && tar -C $RUN/out -cf $RUN/pack/model.tar model && tar -C $RUN/chain -czf $RUN/pack/chain.tar.gz default/adapter_config.json default/adapter_model.safetensors default/training chain.json heads.json recipe.yaml"
if [ -n "${SKIP_TRAIN:-}" ]; then steps="${chain[*]} && $pack"; else steps="${train[*]} && ${chain[*]} && $pack"; fi
setsid nohup bash -c "$steps; echo pipeline-exit \$?" > "$RUN/log.txt" 2>&1 < /dev/null &
echo "started: $RUN/log.txt"

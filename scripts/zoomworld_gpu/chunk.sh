#!/usr/bin/env bash
# One self-contained device call of the ZoomWorld default's training (no process outlives the call, so a
# machine given back between calls loses nothing): continue INIT for SECONDS_BUDGET seconds, probe its
# grounding on validation scenes, and bring back under $OUT model.tar (the model folder), train_log.csv,
# probe.json and log.txt. The next chunk continues from the model.tar that came back (unpacked into .zw/):
#
#   tar -C .zw/init -xf model.tar; git archive -o .zw/src.tar HEAD   # here, between calls; then, on the
#   device (carry .zw and .whl):
#   INIT=.zw/init/model SECONDS_BUDGET=470 LR=3e-4 bash scripts/zoomworld_gpu/chunk.sh
set -euo pipefail
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/zwchunk-out}
RUN=${RUN:-/tmp/zwchunk}
INIT=${INIT:-.zw/init/model}
SECONDS_BUDGET=${SECONDS_BUDGET:-470}
mkdir -p "$RUN" "$OUT"
python3 -m qzoom_adapters.benchmarks.zoomworld.train --plan-seconds "$SECONDS_BUDGET" --max-seconds "$SECONDS_BUDGET" \
  --out "$RUN/out" --init "$INIT" --seed "${SEED:-6}" --batch-size "${BATCH:-64}" --lr "${LR:-3e-4}" \
  --num-workers "${WORKERS:-14}" --budgets "${BUDGETS:-64,128,256,576,1024,1024}" --crop-p "${CROP_P:-0.3}" \
  --bind-weight "${BIND_WEIGHT:-0}" --roi-p "${ROI_P:-0}" \
  2>&1 | tr '\r' '\n' | grep --line-buffered -v -e 'it/s\]$' -e '^training -> ' -e '^\s*$' -e 'Loading weights' > "$OUT/log.txt" || true
tail -n 25 "$OUT/log.txt"
cp "$RUN/out/train_log.csv" "$OUT/" 2>/dev/null || true
[ -f "$RUN/out/model/model.safetensors" ] || { echo "no model saved"; exit 1; }
tar -C "$RUN/out" -cf "$OUT/model.tar" model
timeout "${PROBE_SECONDS:-60}" python3 -m qzoom_adapters.benchmarks.zoomworld.probes --model "$RUN/out/model" --n 48 --grounding-only \
  2>/dev/null > "$OUT/probe.json" || echo "probe did not finish"
cat "$OUT/probe.json"
# CHAIN_SECONDS > 0: then run the Q-Zoom chain on the new model for at most that long (heads, stage-1 labels and
# twig, stage-3 labels and gate, thresholds on validation) and bring back chain.tar.gz: the default folder's
# adapters and training logs, chain.json, heads.json and recipe.yaml (not the images and labels, which the
# recipe rebuilds). A chain cut by the time limit is finished here on CPU from the model.tar.
if [ "${CHAIN_SECONDS:-0}" -gt 0 ]; then
  timeout "$CHAIN_SECONDS" python3 -m qzoom_adapters.benchmarks.zoomworld.chain --model "$RUN/out/model" --out "$RUN/chain" \
    --n "${N:-256}" --n-gate "${N_GATE:-300}" --n-val "${N_VAL:-96}" 2>&1 | tr '\r' '\n' \
    | grep --line-buffered -v -e 'it/s\]$' -e 's/it\]$' -e '^\s*$' -e 'Loading weights' > "$OUT/chain_log.txt" || true
  tail -n 30 "$OUT/chain_log.txt"
  (cd "$RUN/chain" && tar -czf "$OUT/chain.tar.gz" --ignore-failed-read chain.json heads.json recipe.yaml \
     default/adapter_config.json default/adapter_model.safetensors default/training 2>/dev/null) || true
fi

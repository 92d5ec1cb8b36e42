#!/usr/bin/env bash
# One device call: stage 2 (RoI post-SFT) on the shipped ZoomWorld default in one or more variants at once
# (`benchmarks.zoomworld.post_sft`), each with a new gate and both thresholds chosen on validation, compared with
# the default on validation. Brings back under $OUT, per variant NAME: NAME.tar.gz (the new default folder,
# post_sft.json, compare.json) and NAME_log.txt.
#
#   git archive -o .zw/src.tar HEAD   # here, before the call; then, on the device (carry .zw and .whl):
#   VARIANTS="a:1e-4:3 b:3e-4:4" N_POOL=1500 bash scripts/zoomworld_gpu/post_sft.sh
set -euo pipefail
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/postsft-out}
RUN=${RUN:-/tmp/postsft}
mkdir -p "$RUN" "$OUT"
pids=()
for v in ${VARIANTS:-a:1e-4:3}; do
  IFS=: read -r name lr epochs <<< "$v"
  ( timeout "${SECONDS_BUDGET:-480}" python3 -m qzoom_adapters.benchmarks.zoomworld.post_sft \
      --default benchmarks/zoomworld/default --out "$RUN/$name" --n-pool "${N_POOL:-1500}" --n-gate "${N_GATE:-240}" \
      --n-val "${N_VAL:-96}" --lr "$lr" --epochs "$epochs" --batch-size "${BATCH:-16}" 2>&1 | tr '\r' '\n' \
      | grep --line-buffered -v -e 'it/s\]$' -e 's/it\]$' -e '^\s*$' -e 'Loading weights' > "$OUT/${name}_log.txt" || true
    (cd "$RUN/$name" && tar -czf "$OUT/$name.tar.gz" --ignore-failed-read post_sft.json compare.json default \
       mine/mined.jsonl 2>/dev/null) || true ) &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || true; done
for v in ${VARIANTS:-a:1e-4:3}; do
  name=${v%%:*}
  echo "=== $name"; tail -n 8 "$OUT/${name}_log.txt"
  python3 - "$RUN/$name/compare.json" <<'PY' || true
import json, sys
c = json.load(open(sys.argv[1]))
for k in ("default", "post_sft"):
    print(k, c[k]["thresholds"], {b: (round(r["accuracy"]["all"], 3), round(r["accuracy"]["detail"], 3),
                                      round(r["zoom_rate"], 2)) for b, r in c[k]["budgets"].items()})
PY
done

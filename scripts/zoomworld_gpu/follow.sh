#!/usr/bin/env bash
# follow.sh SECONDS: wait for the run started by start.sh or pipeline.sh (at most SECONDS), print the end of
# its log and copy to $OUT the log, the loss curve and what is packed: pipeline.sh packs model.tar (the model
# folder) and chain.tar.gz (adapters, recipe, logs, choices); a start.sh run brings the model folder back
# file by file (at most 8 files come back, so without its tokenizer_config.json, which is fixed).
RUN=${RUN:-/tmp/zwrun}
end=$((SECONDS + ${1:-540}))
while [ $SECONDS -lt "$end" ]; do
  pgrep -f "qzoom_adapters.benchmarks.zoomworld" >/dev/null || { echo "run ended"; break; }
  sleep 10
done
tr '\r' '\n' < "$RUN/log.txt" | grep -v -e '^\s*$' -e 'Loading weights' -e 'it/s\]$' | tail -n 40
cp "$RUN/log.txt" "$OUT/" 2>/dev/null
cp "$RUN/out/train_log.csv" "$OUT/" 2>/dev/null
if [ -d "$RUN/pack" ]; then
  cp "$RUN"/pack/* "$OUT/"
elif [ -d "$RUN/out/model" ] && ! pgrep -f "qzoom_adapters.benchmarks.zoomworld" >/dev/null; then
  mkdir -p "$OUT/model"
  for f in config.json generation_config.json model.safetensors processor_config.json tokenizer.json chat_template.jinja; do
    cp "$RUN/out/model/$f" "$OUT/model/" 2>/dev/null
  done
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv

#!/usr/bin/env bash
# follow.sh SECONDS: wait for the run started by start.sh (at most SECONDS), print the end of its log and
# copy the log, the loss curve and (once saved) the model folder to $OUT.
RUN=${RUN:-/tmp/zwrun}
end=$((SECONDS + ${1:-540}))
while [ $SECONDS -lt "$end" ]; do
  pgrep -f benchmarks.zoomworld.train >/dev/null || { echo "run ended"; break; }
  sleep 10
done
tr '\r' '\n' < "$RUN/log.txt" | grep -v -e '^\s*$' -e 'Loading weights' | tail -n 25
cp "$RUN/log.txt" "$RUN/out/train_log.csv" "$OUT/" 2>/dev/null
# at most 8 files come back: the model folder without its tokenizer_config.json (the tokenizer is fixed;
# copy that file from benchmarks/zoomworld/default/model)
if [ -d "$RUN/out/model" ]; then
  mkdir -p "$OUT/model"
  for f in config.json generation_config.json model.safetensors processor_config.json tokenizer.json chat_template.jinja; do
    cp "$RUN/out/model/$f" "$OUT/model/" 2>/dev/null
  done
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv

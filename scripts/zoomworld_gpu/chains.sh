#!/usr/bin/env bash
# One self-contained device call: the Q-Zoom chain (heads, stage-1 labels and twig, stage-3 labels and gate,
# thresholds on validation) on the shipped default's model in up to three variants side by side on the one GPU,
# then `post_sft.compare` of the shipped default and each finished variant on the same validation questions.
# Brings back under $OUT: chains.tar.gz (each variant's chain.json, heads.json, recipe.yaml and default folder
# without the model, which is the shipped one), compare.json and log.txt. Variants are "name:n:n_gate:grid:batch"
# with an optional ":workers" (processes that draw scenes and load data; default $WORKERS, else 0) and then
# an optional ":budgets" (comma-separated: the twig's training budgets, `--stage1-budgets`) and then an
# optional ":T" (the twig's and the gate's decoder layers, `--twig-layers`). The variants' archive is written
# before the comparison, so a call that runs out of time still brings the trained folders back:
#
#   git archive -o .zw/src.tar HEAD   # here; then on the device (carry .zw and .whl):
#   OMP_NUM_THREADS=4 VARIANTS="a:2048:900:16:32 b:2048:900:12:32" bash scripts/zoomworld_gpu/chains.sh
set -euo pipefail
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/zwchains-out}
RUN=${RUN:-/tmp/zwchains}
MODEL=benchmarks/zoomworld/default/model
mkdir -p "$RUN" "$OUT"
names=()
for v in ${VARIANTS:-a:2048:900:16:32}; do
  IFS=: read -r name n ngate grid batch workers budgets twig <<<"$v"
  names+=("$name")
  (timeout "${CHAIN_SECONDS:-480}" python3 -m qzoom_adapters.benchmarks.zoomworld.chain --model "$MODEL" \
     --out "$RUN/$name" --n "$n" --n-gate "$ngate" --grid "$grid" --batch-size "$batch" \
     --workers "${workers:-${WORKERS:-0}}" ${budgets:+--stage1-budgets "$budgets"} ${twig:+--twig-layers "$twig"} --heads-limit "${HEADS_LIMIT:-256}" --n-val "${N_VAL:-96}" 2>&1 \
     | tr '\r' '\n' | grep --line-buffered -v -e 'it/s\]$' -e 's/it\]$' -e '[0-9]/[0-9]* \[[0-9:]*<' -e '^\s*$' -e 'Loading weights' \
     > "$OUT/log_$name.txt" || true) &
done
wait
for name in "${names[@]}"; do echo "== $name"; tail -n 12 "$OUT/log_$name.txt"; done
(cd "$RUN" && tar -czf "$OUT/chains.tar.gz" --ignore-failed-read --exclude='*/default/model' \
   $(for n in "${names[@]}"; do echo "$n/chain.json $n/heads.json $n/recipe.yaml $n/default"; done) 2>/dev/null) || true
python3 - "$RUN" "$OUT/compare.json" "${N_VAL:-96}" "${names[@]}" <<'PY'
import json, sys
from pathlib import Path
from qzoom_adapters.benchmarks.zoomworld.post_sft import compare
run, out, n_val, names = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
folders = {"shipped": Path("benchmarks/zoomworld/default")}
folders.update({n: run / n / "default" for n in names if (run / n / "default" / "training" / "chain.json").is_file()})
result = compare(folders, n_val, [64, 128, 256])
out.write_text(json.dumps(result, indent=1) + "\n")
for name in folders:
    acc = {b: {k: round(v, 3) for k, v in r["accuracy"].items()} for b, r in result[name]["budgets"].items()}
    print(name, result[name]["thresholds"], acc)
PY
cat "$OUT"/log_*.txt > "$OUT/log.txt"; rm -f "$OUT"/log_*.txt

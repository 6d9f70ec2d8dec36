#!/usr/bin/env bash
# Every Table-1 method on the synthetic demo set (configs/demo.py, fold 0, CPU budgets of
# the demo config), then the table:
#
#   bash scripts/table1_demo.sh [OUT]        # default OUT=runs/table1_demo
#
# Each method trains in its own work directory under OUT; re-running resumes or skips
# what is done (main resumes from checkpoints). D-Persona's heads sit on ProSona's Stage 1
# of the same run. Wall and CPU seconds per method go to OUT/cost.tsv.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/table1_demo}
PY=${PYTHON:-python}
mkdir -p "$OUT"
DEMO=(--config=configs/demo.py)
cost="$OUT/cost.tsv"
[[ -f "$cost" ]] || printf 'method\twall_s\tcpu_s\n' > "$cost"

run() {  # run NAME FLAGS...: trains one method into OUT/NAME, appends its cost.
  local name=$1; shift
  if [[ -f "$OUT/$name/eval/summary.md" ]]; then
    echo "== $name: done before ($OUT/$name/eval/summary.md)"; return
  fi
  echo "== $name"
  local t0 c0 t1 c1
  t0=$(date +%s.%N); c0=$(awk '{print $14+$15+$16+$17}' /proc/$$/stat)
  "$PY" -m prosona_jax.main "${DEMO[@]}" --workdir="$OUT/$name" "$@"
  t1=$(date +%s.%N); c1=$(awk '{print $14+$15+$16+$17}' /proc/$$/stat)
  printf '%s\t%.0f\t%.0f\n' "$name" "$(echo "$t1 - $t0" | bc)" \
    "$(echo "($c1 - $c0) / $(getconf CLK_TCK)" | bc -l)" >> "$cost"
}

run prosona
run unet --config.method=unet --config.rater=-1
run cm_global --config.method=cm_global
run cm_global_2class --config.method=cm_global --config.cm_global.num_classes=2
run cm_pixel --config.method=cm_pixel
run cm_pixel_2class --config.method=cm_pixel --config.cm_pixel.num_classes=2
run pionono --config.method=pionono
run dpersona --config.method=dpersona --config.stages=dpersona \
  --config.dpersona.init_from="$OUT/prosona/fold{fold}/stage1/checkpoints"
run tab --config.method=tab
"$PY" -m prosona_jax.table "$OUT"/*/ --stage1 --out="$OUT"
echo "Cost per method (wall and CPU seconds): $cost"
column -t "$cost"

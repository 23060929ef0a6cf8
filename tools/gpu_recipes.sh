#!/usr/bin/env bash
# Several tools/dense_next_item.py runs side by side on one GPU, each bounded in wall time: how far a training
# recipe (objective, dropout, history length, lr) takes the tower when epochs are cheap. Needs only torch
# (CUDA build), pyarrow and omegaconf, and the converted data sets (data/ml1m, data/games).
#
#   tools/gpu_recipes.sh OUT_DIR [MINUTES] [RECIPES_FILE]
#
# Each line of RECIPES below (or of RECIPES_FILE, where given; $EXACT and $SASREC_GAMES expand there too) is
# NAME CONFIG ARGS...; every run trains for MINUTES (default 6.5), validates every
# 5 epochs and tests the best validation epoch on every user. Writes OUT_DIR/NAME.json per run and one
# OUT_DIR/log.txt with every run's console output (few files: the device tool returns at most 8).
set -u
OUT=${1:?usage: tools/gpu_recipes.sh OUT_DIR [MINUTES] [RECIPES_FILE]}
MIN=${2:-6.5}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOGS=$(mktemp -d)
EXACT="--set model.attention=sdpa"
SASREC_GAMES="--set model.dropout=0.5 --set data.max_hist_len=50 --lr 0.001"
RECIPES=(
  "games_bce1_sasrec configs/games.yaml $EXACT $SASREC_GAMES --objective bce --negatives 1"
  "games_ce_sasrec configs/games.yaml $EXACT $SASREC_GAMES --objective ce"
  "games_bce1_sasrec_svd16 configs/games.yaml $SASREC_GAMES --objective bce --negatives 1"
  "games_bce1_d02 configs/games.yaml $EXACT --set model.dropout=0.2 --set data.max_hist_len=50 --lr 0.001 --objective bce --negatives 1"
  "ml1m_bce1_sasrec configs/ml1m.yaml $EXACT --lr 0.001 --objective bce --negatives 1"
)
if [ -n "${3:-}" ]; then
  mapfile -t RECIPES < <(grep -v '^\s*#' "$3" | grep -v '^\s*$' | while read -r l; do eval "echo $l"; done)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$LOGS/gpu.txt" 2>&1
for r in "${RECIPES[@]}"; do
  set -- $r
  name=$1; shift
  # shellcheck disable=SC2086
  timeout $(( ${MIN%.*} * 60 + 150 )) $PY tools/dense_next_item.py "$@" --epochs 1000 --minutes "$MIN" \
    --eval-every 5 --json "$OUT/$name.json" > "$LOGS/$name.log" 2>&1 &
done
wait
{
  cat "$LOGS/gpu.txt"
  for r in "${RECIPES[@]}"; do
    set -- $r
    echo "== $*"; cat "$LOGS/$1.log"
  done
} > "$OUT/log.txt"
for r in "${RECIPES[@]}"; do
  set -- $r
  echo "== $*"; tail -n 2 "$LOGS/$1.log"
done

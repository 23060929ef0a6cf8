#!/usr/bin/env bash
# One short, prepared GPU session: the ops' CUDA path against their reference twin, the attention benchmarks
# on the GPU (float32 and bfloat16), and the tower trained alone on ML-1M (tools/dense_next_item.py).
# Needs only torch (CUDA build), pyarrow, pytest, hypothesis and omegaconf, so that it runs on a bare GPU
# machine where TorchRec, fbgemm-gpu and DeepSpeed are not installed; data/ml1m must exist (solar data convert).
#
#   tools/gpu_check.sh OUT_DIR [SECONDS]
#
# SECONDS (default 540) bounds the whole script: the ML-1M run gets whatever the earlier steps leave, less a
# margin for its final test evaluation. Writes OUT_DIR/{log.txt, bench_attention_*.json, bench_causal_*.json,
# dense_ml1m.json}.
set -u
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR [SECONDS]}
BUDGET=${2:-540}
START=$(date +%s)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
left() { echo $((BUDGET - ($(date +%s) - START))); }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

  echo "== ops on CUDA vs the reference twin"
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/ops/test_cuda.py 2>&1 | tail -n 25

  for dt in float32 bfloat16; do
    echo "== bench_attention $dt"
    timeout 75 $PY tools/bench_attention.py --n 1000 5000 10000 20000 --m self 4000 --rank 16 --batch 8 \
      --dim 128 --heads 4 --methods svd sdpa truncate --svd-methods randomized --passes fwd fwdbwd \
      --dtype "$dt" --json "$OUT/bench_attention_$dt.json" 2>&1 | tail -n 40
  done
  echo "== bench_causal float32 (next-item training at every position)"
  timeout 60 $PY tools/bench_causal.py --n 200 1000 5000 --batch 32 --json "$OUT/bench_causal_float32.json" 2>&1 \
    | tail -n 8

  T=$(( $(left) - 100 ))
  echo "== dense ML-1M: $T s of training"
  if [ "$T" -gt 60 ]; then
    timeout $((T + 90)) $PY tools/dense_next_item.py configs/ml1m.yaml --epochs 1000 --minutes "$($PY -c "print($T / 60)")" \
      --eval-every 5 --json "$OUT/dense_ml1m.json" 2>&1 | tail -n 60
  fi
  echo "== done after $(( $(date +%s) - START )) s"
} 2>&1 | tee "$OUT/log.txt"

#!/usr/bin/env bash
# One machine without GPUs: NPROC processes on the CPU, gloo, through the same DeepSpeed launcher.
#
#   launch/local.sh NPROC CONFIG [key=value ...]      e.g. launch/local.sh 4 configs/quickstart.yaml parallel.sp=2
#
# The same config runs unchanged under launch/deepspeed.sh on GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: launch/local.sh NPROC CONFIG [key=value ...]" >&2
  exit 2
fi
NPROC=$1; shift
VENV=${VENV:-.venv}
[ -x "$VENV/bin/deepspeed" ] || bash tools/setup_env.sh
export DS_ACCELERATOR=cpu
export PYTHONUNBUFFERED=1
# each rank gets its share of the cores (torch would otherwise start one thread per core in every rank)
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}
PORT=${MASTER_PORT:-$("$VENV/bin/python" -c 'from solar_dist.parallel.groups import free_port; print(free_port())')}
exec "$VENV/bin/deepspeed" --num_accelerators "$NPROC" --master_port "$PORT" --no_local_rank \
  --module solar_dist.cli train "$@" parallel.backend=gloo parallel.device=cpu

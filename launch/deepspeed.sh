#!/usr/bin/env bash
# Launch `solar train` with the DeepSpeed launcher (GPU clusters).
#
#   single node, 8 GPUs:  launch/deepspeed.sh --num_gpus 8 configs/x.yaml [key=value ...]
#   multi-node:           launch/deepspeed.sh --hostfile launch/hostfile.example --master_addr node1 configs/x.yaml
#
# Launcher options (everything before the config) are passed to `deepspeed` unchanged; the launcher starts
# one process per GPU on every host of the hostfile (passwordless ssh, the same checkout and .venv path on
# every host). World = dp x sp from `parallel.sp` in the config.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/deepspeed" ] || bash tools/setup_env.sh
ds_args=()
while [ $# -gt 0 ] && [[ "$1" == --* ]]; do
  case "$1" in
    --num_gpus|--num_accelerators|--num_nodes|--hostfile|--master_addr|--master_port|--include|--exclude|--launcher|--ssh_port)
      ds_args+=("$1" "$2"); shift 2 ;;
    *) ds_args+=("$1"); shift ;;
  esac
done
if [ $# -lt 1 ]; then
  echo "usage: launch/deepspeed.sh [deepspeed launcher options] CONFIG [key=value ...]" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
exec "$VENV/bin/deepspeed" "${ds_args[@]}" --no_local_rank --module solar_dist.cli train "$@"

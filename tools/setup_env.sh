#!/usr/bin/env bash
# Creates .venv with the pinned stack. Idempotent: exits at once when .venv is complete.
#
# Why a script and not a plain `pip install -e .`: torchrec declares a dependency on `fbgemm-gpu` (the CUDA
# build). On a machine without CUDA that wheel overwrites fbgemm-gpu-cpu's files and then fails to load
# (libtorch_cuda.so). So torch and fbgemm are installed first, matching the machine, and torchrec with
# --no-deps plus its other requirements.
#
# Environment: PYTHON (default python3.11 or python3), TORCH_INDEX_URL (e.g. the PyTorch CPU wheel index on a
# machine whose pip would otherwise take a CUDA build), SOLAR_CUDA=0/1 to force the choice.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.solar-env-complete"
REQ_HASH=$(cat tools/setup_env.sh setup.cfg | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQ_HASH" ]; then exit 0; fi

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=(pip_quiet "$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# pip prints a warning per package for local index folders it cannot use; keep real errors visible.
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if [ -n "${SOLAR_CUDA:-}" ]; then CUDA=$SOLAR_CUDA
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then CUDA=1
else CUDA=0; fi

TORCH_ARGS=()
[ -n "${TORCH_INDEX_URL:-}" ] && TORCH_ARGS+=(--extra-index-url "$TORCH_INDEX_URL")
if [ "$CUDA" = 1 ]; then
  echo "[setup] CUDA machine: torch 2.13.0 + fbgemm-gpu 1.8.0 (CUDA builds)"
  "${PIP[@]}" "${TORCH_ARGS[@]}" torch==2.13.0 fbgemm-gpu==1.8.0
else
  echo "[setup] CPU machine: torch 2.13.0 + fbgemm-gpu-cpu 1.8.0"
  "${PIP[@]}" "${TORCH_ARGS[@]}" torch==2.13.0 fbgemm-gpu-cpu==1.8.0
fi
# torchrec's own requirements except fbgemm-gpu (already satisfied by the build chosen above). pip then
# reports "torchrec 1.8.0 requires fbgemm-gpu, which is not installed": expected, fbgemm-gpu-cpu provides it.
"${PIP[@]}" --no-deps torchrec==1.8.0
"${PIP[@]}" "torchmetrics==1.0.3" tensordict pyre-extensions tqdm iopath
# The rest of the stack, then the project itself (editable, no deps: they are all pinned above).
"${PIP[@]}" "deepspeed==0.19.8" "ray[data,tune,train]==2.60.0" "omegaconf==2.4.0" pyarrow pandas \
  tensorboard matplotlib pytest pytest-timeout hypothesis rich
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" - <<'PY'
import torch, fbgemm_gpu, torchrec, deepspeed, ray, omegaconf  # noqa: F401  fail here, not mid-run
print(f"[setup] ok: torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec,'__version__') else '1.8.0'}, "
      f"deepspeed {deepspeed.__version__}, ray {ray.__version__}, omegaconf {omegaconf.__version__}")
PY
echo "$REQ_HASH" > "$STAMP"

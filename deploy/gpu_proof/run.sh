#!/usr/bin/env bash
# The GPU proof on the device machine, in one call (deploy/gpu_proof/README.md):
#
#     bash deploy/gpu_proof/run.sh --out "$OUT"        # or: make gpu-proof GPU_PROOF_ARGS="--out $OUT"
#
# Everything is `python -m lesionserve.gpu_proof device` (`--help` lists its options); this wrapper
# adds the hard stop: SIGTERM at GPU_PROOF_HARD_LIMIT seconds (default 470, under 8 minutes), SIGKILL
# 15 s later. The Python side ends its stages before that (--budget) and, on SIGTERM, stops its
# children and writes what it has. PYTHON picks the interpreter (default python3, the GPU host's).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
HARD_LIMIT="${GPU_PROOF_HARD_LIMIT:-470}"

case "$HARD_LIMIT" in
  ''|*[!0-9]*) echo "run.sh: GPU_PROOF_HARD_LIMIT must be a whole number of seconds, got '$HARD_LIMIT'" >&2; exit 2 ;;
esac
if [ "$HARD_LIMIT" -lt 90 ] || [ "$HARD_LIMIT" -gt 480 ]; then
  echo "run.sh: GPU_PROOF_HARD_LIMIT must be 90..480 seconds (the proof must end within 8 minutes), got $HARD_LIMIT" >&2
  exit 2
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "run.sh: no '$PYTHON' on PATH (set PYTHON=/path/to/python3)" >&2
  exit 2
fi

cd "$ROOT" || exit 2
export PYTHONUNBUFFERED=1 GPU_PROOF_HARD_LIMIT="$HARD_LIMIT"
if command -v timeout >/dev/null 2>&1; then
  exec timeout --signal=TERM --kill-after=15 "$HARD_LIMIT" "$PYTHON" -m lesionserve.gpu_proof device "$@"
fi
echo "run.sh: no 'timeout' command here: only the Python side's --budget bounds the run" >&2
exec "$PYTHON" -m lesionserve.gpu_proof device "$@"

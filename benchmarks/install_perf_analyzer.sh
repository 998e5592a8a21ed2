#!/usr/bin/env bash
# Install perf_analyzer into benchmarks/.tools (git-ignored), without root and without touching .venv.
#
# PyPI's `perf-analyzer` is an empty placeholder on these machines; the binary ships inside the
# tritonclient 2.41.0 platform wheel. It needs libb64.so.0d (Debian package libb64-0d) and
# libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12; loaded even for CPU-only runs). We extract all
# three rather than installing the old tritonclient over the pinned one.
#
#   benchmarks/install_perf_analyzer.sh         # prints the binary's path; a second run does nothing
set -euo pipefail
cd "$(dirname "$0")"
TOOLS="$PWD/.tools"
BIN="$TOOLS/perf_analyzer"
PY="${PY:-../.venv/bin/python}"

if [ -x "$BIN" ] && LD_LIBRARY_PATH="$TOOLS/lib" "$BIN" --version >/dev/null 2>&1; then
  echo "$BIN"
  exit 0
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$TOOLS/lib"

echo "downloading tritonclient==2.41.0 (for perf_analyzer), nvidia-cuda-runtime-cu12 and libb64-0d ..." >&2
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --platform manylinux1_x86_64 --python-version 3.11 -d "$WORK" tritonclient==2.41.0 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --platform manylinux2014_x86_64 --python-version 3.11 -d "$WORK" "nvidia-cuda-runtime-cu12==12.9.79" 2>&1 | grep -v "^WARNING: Location" >&2 || true
(cd "$WORK" && apt-get download libb64-0d >/dev/null 2>&1) || {
  echo "error: 'apt-get download libb64-0d' failed: perf_analyzer needs libb64.so.0d from Debian's libb64-0d" >&2
  exit 1
}

unzip -o -j -q "$WORK"/tritonclient-2.41.0-*.whl 'tritonclient-2.41.0.data/data/bin/perf_analyzer' -d "$TOOLS"
unzip -o -j -q "$WORK"/nvidia_cuda_runtime_cu12-*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' -d "$TOOLS/lib"
dpkg-deb -x "$WORK"/libb64-0d_*.deb "$WORK/deb"
cp "$WORK"/deb/usr/lib/x86_64-linux-gnu/libb64.so.0d "$TOOLS/lib/"
chmod +x "$BIN"

if ! LD_LIBRARY_PATH="$TOOLS/lib" "$BIN" --version >&2; then
  echo "error: $BIN does not run; missing libraries:" >&2
  LD_LIBRARY_PATH="$TOOLS/lib" ldd "$BIN" | grep "not found" >&2 || true
  exit 1
fi
echo "$BIN"

#!/usr/bin/env bash
# Builds `miniwob-steer --features cuda` on a machine with no GPU and no system CUDA toolkit, and
# packs it for a GPU machine (docs/cuda.md).
#
# 1. Downloads nvcc, the CUDA headers and the CUDA libraries from NVIDIA's PyPI wheels (pinned to
#    CUDA 13.0, the toolkit of driver 580, and to the library versions torch 2.11's cu13 wheels
#    pull in) into $CUDA_CACHE (default ~/.cache/miniwob-steer/cuda) and lays them out as a
#    toolkit root: bin/ (nvcc, ptxas), nvvm/, include/, lib/ (+ unversioned .so links and a
#    libcuda.so link stub: the driver library is not on PyPI; the real one comes with the driver).
# 2. Builds `cargo build --release --features cuda -p miniwob-steer` into target/cuda (its own
#    CARGO_TARGET_DIR, so the CPU build in target/release stays valid), kernels for
#    CUDA_COMPUTE_CAP (default 90: H100/H200).
# 3. Strips the binary and packs dist/miniwob-steer-cuda.tar.zst (bin/miniwob-steer, env.sh that
#    finds the CUDA libraries of the GPU machine's torch install, libcudart as a fallback,
#    BUILD-INFO). Prints sizes.
#
# Usage: scripts/build-cuda.sh [--env-only] [--no-pack] [--pack-only]
#   --env-only   only prepare the toolkit and print `export` lines (eval "$(scripts/build-cuda.sh --env-only)")
#   --no-pack    build but do not pack
#   --pack-only  pack the binary already in target/cuda (no cargo build)
# Environment: CUDA_COMPUTE_CAP (default 90), CUDA_CACHE, NICE (default 10), CARGO_BUILD_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

ENV_ONLY=0
PACK=1
BUILD=1
for arg in "$@"; do
  case "$arg" in
    --env-only) ENV_ONLY=1 ;;
    --no-pack) PACK=0 ;;
    --pack-only) BUILD=0 ;;
    -h|--help) sed -n 2,23p "$0"; exit 0 ;;
    *) echo "build-cuda.sh: unknown argument $arg (expected --env-only or --no-pack)" >&2; exit 2 ;;
  esac
done

CUDA_VERSION=13.0
# Wheel pins: nvcc/nvvm/crt/nvrtc 13.0.88 emit PTX ISA 9.0, which the 580 driver's JIT loads (a newer
# nvcc emits PTX that the 580 driver refuses). cublas/runtime/curand as torch 2.11 (cu13) pins them.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.0.3
  nvidia-curand==10.4.0.35
)
CUDA_CACHE="${CUDA_CACHE:-$HOME/.cache/miniwob-steer/cuda}"
ROOT="$CUDA_CACHE/$CUDA_VERSION"
STAMP="$ROOT/.complete-$(printf '%s\n' "${WHEELS[@]}" | sha256sum | cut -c1-16)"
log() { echo "[build-cuda] $*" >&2; }

prepare_toolkit() {
  if [ -f "$STAMP" ]; then
    log "toolkit ready: $ROOT"
    return
  fi
  local py
  py="$(command -v python3 || true)"
  [ -n "$py" ] || { echo "build-cuda.sh: python3 (with pip) is needed to download NVIDIA's wheels" >&2; exit 1; }
  mkdir -p "$CUDA_CACHE/wheels"
  log "downloading ${#WHEELS[@]} wheels from PyPI into $CUDA_CACHE/wheels"
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64 \
    --python-version 3.11 -d "$CUDA_CACHE/wheels" "${WHEELS[@]}"
  rm -rf "$ROOT" "$CUDA_CACHE/unpack"
  mkdir -p "$CUDA_CACHE/unpack"
  local spec name ver whl
  for spec in "${WHEELS[@]}"; do
    name="${spec%%==*}"; ver="${spec##*==}"
    whl="$(ls "$CUDA_CACHE/wheels/${name//-/_}-$ver-"*.whl 2>/dev/null | head -1)"
    [ -n "$whl" ] || { echo "build-cuda.sh: wheel for $spec not found in $CUDA_CACHE/wheels after pip download" >&2; exit 1; }
    python3 -m zipfile -e "$whl" "$CUDA_CACHE/unpack"
  done
  [ -d "$CUDA_CACHE/unpack/nvidia/cu13" ] || { echo "build-cuda.sh: expected nvidia/cu13/ inside the wheels; found: $(ls "$CUDA_CACHE/unpack/nvidia")" >&2; exit 1; }
  mv "$CUDA_CACHE/unpack/nvidia/cu13" "$ROOT"
  rm -rf "$CUDA_CACHE/unpack"
  chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/* 2>/dev/null || true
  # Unversioned names for the linker (the wheels ship only the sonames).
  local so base
  for so in "$ROOT"/lib/lib*.so.*; do
    base="$(basename "$so")"; base="${base%%.so.*}.so"
    [ -e "$ROOT/lib/$base" ] || ln -s "$(basename "$so")" "$ROOT/lib/$base"
  done
  make_libcuda_stub
  touch "$STAMP"
  log "toolkit ready: $ROOT ($(du -sh "$ROOT" | cut -f1))"
}

# A link-time stand-in for the driver library (soname libcuda.so.1; the GPU machine's driver
# provides the real one): every cu* function cudarc declares, as an empty symbol.
make_libcuda_stub() {
  local cargo_home="${CARGO_HOME:-$HOME/.cargo}" ver src
  ver="$(awk '/^name = "cudarc"/{getline; gsub(/"/,"",$3); print $3}' "$REPO/Cargo.lock")"
  [ -n "$ver" ] || { echo "build-cuda.sh: no cudarc entry in Cargo.lock (is the cuda feature's lock resolved?)" >&2; exit 1; }
  (cd "$REPO" && cargo fetch -q) || true
  src="$(ls -d "$cargo_home"/registry/src/*/cudarc-"$ver"/src/driver/sys/mod.rs 2>/dev/null | head -1)"
  [ -n "$src" ] || { echo "build-cuda.sh: cudarc $ver sources not found under $cargo_home/registry/src (run cargo fetch)" >&2; exit 1; }
  mkdir -p "$ROOT/lib/stubs"
  grep -oE '^ +fn cu[A-Za-z0-9_]+\(' "$src" | sed -E 's/^ +fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' > "$ROOT/lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" "$ROOT/lib/stubs/libcuda_stub.c"
  log "libcuda.so link stub: $(wc -l < "$ROOT/lib/stubs/libcuda_stub.c") symbols from cudarc $ver"
}

prepare_toolkit
export CUDA_ROOT="$ROOT" CUDA_PATH="$ROOT" CUDA_HOME="$ROOT" CUDA_TOOLKIT_ROOT_DIR="$ROOT"
export NVCC="$ROOT/bin/nvcc" PATH="$ROOT/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$ROOT/lib:$ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target/cuda}"
if [ "$ENV_ONLY" = 1 ]; then
  for v in CUDA_ROOT CUDA_PATH CUDA_HOME CUDA_TOOLKIT_ROOT_DIR NVCC PATH CUDA_COMPUTE_CAP CUDARC_CUDA_VERSION LIBRARY_PATH CARGO_TARGET_DIR; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
  exit 0
fi

BIN="$CARGO_TARGET_DIR/release/miniwob-steer"
if [ "$BUILD" = 1 ]; then
  "$NVCC" --version | tail -2 >&2
  log "cargo build --release --features cuda (compute capability $CUDA_COMPUTE_CAP) into $CARGO_TARGET_DIR"
  T0=$(date +%s)
  nice -n "${NICE:-10}" cargo build --release --features cuda -p miniwob-steer --bin miniwob-steer
  T1=$(date +%s)
  log "built in $((T1 - T0)) s: $BIN ($(du -h "$BIN" | cut -f1))"
fi
[ -x "$BIN" ] || { echo "build-cuda.sh: no binary at $BIN to pack" >&2; exit 1; }
[ "$PACK" = 1 ] || exit 0

DIST="$REPO/dist/miniwob-steer-cuda"
rm -rf "$DIST" && mkdir -p "$DIST/bin" "$DIST/lib"
strip -o "$DIST/bin/miniwob-steer" "$BIN"
cp -L "$ROOT/lib/libcudart.so.13" "$DIST/lib/"
cat > "$DIST/env.sh" <<'ENVEOF'
# Source this on the GPU machine: puts the CUDA 13 libraries the binary links against
# (libcublas/libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13, libcudart.so.13) on
# LD_LIBRARY_PATH. They come from the torch install's nvidia wheels (nvidia/cu13/lib), or from
# $CUDA_LIB_DIR, or a system toolkit; libcudart.so.13 also ships in lib/ as a fallback.
# libcuda.so.1 comes with the NVIDIA driver.
_MSC_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_MSC_PY="${PYTHON:-python3}"
_MSC_LIBS="${CUDA_LIB_DIR:-}"
if [ -z "$_MSC_LIBS" ]; then
  _MSC_LIBS="$("$_MSC_PY" - <<'PY' 2>/dev/null || true
import importlib.util, os, sys
for base in sys.path:
    d = os.path.join(base, "nvidia", "cu13", "lib")
    if os.path.exists(os.path.join(d, "libcublas.so.13")):
        print(d); break
PY
)"
fi
for _d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64; do
  [ -z "$_MSC_LIBS" ] && [ -e "$_d/libcublas.so.13" ] && _MSC_LIBS="$_d"
done
if [ -z "$_MSC_LIBS" ]; then
  echo "env.sh: no libcublas.so.13 found (torch's nvidia/cu13/lib via $_MSC_PY, /usr/local/cuda/lib64); set CUDA_LIB_DIR" >&2
else
  export LD_LIBRARY_PATH="$_MSC_LIBS:$_MSC_HERE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export PATH="$_MSC_HERE/bin:$PATH"
unset _MSC_HERE _MSC_PY _MSC_LIBS _d
ENVEOF
{
  echo "miniwob-steer --features cuda; source tree at packing: $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
  echo "binary built $(date -u -r "$BIN" +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), $(nvcc --version | tail -1)"
  echo "compute capability: $CUDA_COMPUTE_CAP (CUDA_COMPUTE_CAP)"
  echo "wheels: ${WHEELS[*]}"
  echo "needs at run time (NEEDED):"
  readelf -d "$DIST/bin/miniwob-steer" | awk '/NEEDED/{print "  " $NF}' | tr -d '[]'
} > "$DIST/BUILD-INFO"
cat "$DIST/BUILD-INFO" >&2
# .tar.gz always (any machine unpacks it); .tar.zst too when zstd is here (smaller).
rm -f "$REPO"/dist/miniwob-steer-cuda.tar.*
tar -C "$REPO/dist" -cf - miniwob-steer-cuda | gzip -9 > "$REPO/dist/miniwob-steer-cuda.tar.gz"
OUT="$REPO/dist/miniwob-steer-cuda.tar.gz"
if command -v zstd >/dev/null; then
  tar -C "$REPO/dist" -cf - miniwob-steer-cuda | zstd -q -19 -T0 -f -o "$REPO/dist/miniwob-steer-cuda.tar.zst"
  OUT="$REPO/dist/miniwob-steer-cuda.tar.zst"
fi
log "binary $(du -h "$BIN" | cut -f1) built, $(du -h "$DIST/bin/miniwob-steer" | cut -f1) stripped; packed: $(du -h "$REPO"/dist/miniwob-steer-cuda.tar.* | awk '{printf "%s %s  ", $2, $1}')"
echo "$OUT"

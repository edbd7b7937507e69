#!/usr/bin/env bash
# The GPU check of issue 10 (docs/cuda.md), runnable on a machine with only the packed binary
# (scripts/build-cuda.sh → dist/miniwob-steer-cuda.tar.zst), this repository's tests/fixtures and
# scripts, and a Python with torch + transformers; no Rust, no network.
#
#  1. golden comparisons on the device: `check-goldens --dtype f32` (1e-4 as on the CPU) and
#     `--dtype bf16` (top-1 and cosine);
#  2. seeded random checkpoints at the real shapes (scripts/goldens/random_checkpoints.py);
#  3. per model: `bench paired` (ours) and scripts/peer/hf_paired.py (transformers) on the same
#     device, checkpoint and workload (text models: 400-token prompt; Qwen2-VL: the screenshot
#     workload, 487 tokens of which 165 image tokens; hook at the auto layer, 64 + 64 new
#     tokens, batch 1 sequential and batch 2; decode, prefill, all-layer extraction; peak memory);
#  4. a markdown report with the ratios: $OUT/report.md.
#
# Usage: scripts/gpu-check.sh [--device cuda|cuda:N|cpu] [--small] [--bin PATH] [--python PATH]
#          [--out DIR] [--models a,b] [--dtype bf16|f32] [--prompt-tokens N] [--vlm-prompt-tokens N]
#          [--new-tokens N] [--reps N]
#   --small   CPU-sized run to prove the flow: smollm2-135m (64 prompt tokens) and the committed
#             tiny Qwen2-VL (tests/fixtures/tiny-qwen2-vl, the full 487-token image workload),
#             8 new tokens, 1 rep
#   --models  names of scripts/goldens/random_checkpoints.py, or tiny-qwen2-vl (the fixture)
# Environment: CKPT_DIR (random checkpoints; default ~/.cache/miniwob-steer/random).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
DEVICE=cuda SMALL=0 BIN="" PY="" OUT="" MODELS="" DTYPE="" PT="" VPT="" NT="" REPS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --small) SMALL=1; shift ;;
    --bin) BIN="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --models) MODELS="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --prompt-tokens) PT="$2"; shift 2 ;;
    --vlm-prompt-tokens) VPT="$2"; shift 2 ;;
    --new-tokens) NT="$2"; shift 2 ;;
    --reps) REPS="$2"; shift 2 ;;
    -h|--help) sed -n 2,24p "$0"; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
log() { echo "[gpu-check $(date -u +%H:%M:%S)] $*" >&2; }

# The binary: --bin, else the unpacked dist/, else unpack dist/*.tar.zst or .tar.gz.
if [ -z "$BIN" ]; then
  PKG="$REPO/dist/miniwob-steer-cuda"
  if [ ! -x "$PKG/bin/miniwob-steer" ]; then
    if [ -f "$REPO/dist/miniwob-steer-cuda.tar.gz" ] && ! command -v zstd >/dev/null; then
      log "unpacking dist/miniwob-steer-cuda.tar.gz"
      tar -C "$REPO/dist" -xzf "$REPO/dist/miniwob-steer-cuda.tar.gz"
    elif [ -f "$REPO/dist/miniwob-steer-cuda.tar.zst" ]; then
      log "unpacking dist/miniwob-steer-cuda.tar.zst"
      if command -v zstd >/dev/null; then
        zstd -dc "$REPO/dist/miniwob-steer-cuda.tar.zst" | tar -C "$REPO/dist" -xf -
      else
        "${PY:-python3}" -c "import sys,tarfile,zstandard" 2>/dev/null \
          || { echo "gpu-check.sh: need zstd (or python zstandard) to unpack dist/miniwob-steer-cuda.tar.zst" >&2; exit 1; }
        "${PY:-python3}" - "$REPO/dist/miniwob-steer-cuda.tar.zst" "$REPO/dist" <<'PY'
import sys, tarfile, zstandard
with open(sys.argv[1], "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
    tarfile.open(fileobj=r, mode="r|").extractall(sys.argv[2])
PY
      fi
    elif [ -f "$REPO/dist/miniwob-steer-cuda.tar.gz" ]; then
      tar -C "$REPO/dist" -xzf "$REPO/dist/miniwob-steer-cuda.tar.gz"
    fi
  fi
  BIN="$PKG/bin/miniwob-steer"
fi
[ -x "$BIN" ] || { echo "gpu-check.sh: no binary at $BIN (run scripts/build-cuda.sh, copy dist/, or pass --bin)" >&2; exit 1; }
if [ -z "$PY" ]; then
  if [ -x "$REPO/target/py/bin/python" ]; then PY="$REPO/target/py/bin/python"; else PY="$(command -v python3)"; fi
fi
"$PY" -c "import torch, transformers" || { echo "gpu-check.sh: $PY lacks torch/transformers" >&2; exit 1; }
# The CUDA libraries the binary links against, from this Python's torch install.
ENVSH="$(dirname "$(dirname "$BIN")")/env.sh"
if [ -f "$ENVSH" ]; then
  # shellcheck disable=SC1090
  PYTHON="$PY" source "$ENVSH"
fi

case "$DEVICE" in cpu) CPU=1 ;; *) CPU=0 ;; esac
if [ "$SMALL" = 1 ]; then
  MODELS="${MODELS:-smollm2-135m,tiny-qwen2-vl}"; PT="${PT:-64}"; NT="${NT:-8}"; REPS="${REPS:-1}"
fi
MODELS="${MODELS:-qwen2.5-0.5b,qwen2.5-1.5b,llama-3.2-1b,smollm2-135m,qwen2-vl-2b}"
PT="${PT:-400}"; VPT="${VPT:-487}"; NT="${NT:-64}"; REPS="${REPS:-3}"
if [ -z "$DTYPE" ]; then if [ "$CPU" = 1 ]; then DTYPE=f32; else DTYPE=bf16; fi; fi
THREADS="$(nproc 2>/dev/null || echo 2)"; [ "$CPU" = 1 ] && THREADS="${THREADS_CPU:-2}"
OUT="${OUT:-$REPO/results/gpu-check/$(date -u +%Y%m%dT%H%M%SZ)}"
CKPT_DIR="${CKPT_DIR:-$HOME/.cache/miniwob-steer/random}"
mkdir -p "$OUT"
log "binary $BIN; python $PY; device $DEVICE; dtype $DTYPE; models $MODELS; out $OUT"

GPU_NAME=""
if [ "$CPU" = 0 ] && command -v nvidia-smi >/dev/null; then
  GPU_NAME="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
fi
FAILED=0

# 1. Goldens.
GOLDENS=()
for dt in f32 bf16; do
  log "check-goldens --device $DEVICE --dtype $dt"
  if "$BIN" check-goldens --device "$DEVICE" --dtype "$dt" --fixtures "$REPO/tests/fixtures" --json "$OUT/goldens-$dt.json" \
      > "$OUT/goldens-$dt.md" 2> "$OUT/goldens-$dt.log"; then
    log "goldens $dt: passed"
  else
    log "goldens $dt: FAILED (see $OUT/goldens-$dt.md, .log)"; FAILED=1
  fi
  GOLDENS+=("$OUT/goldens-$dt.json")
done

# 2. Random checkpoints at the real shapes (tiny-qwen2-vl is the committed fixture instead).
RANDOM_MODELS="$(echo "$MODELS" | tr ',' '\n' | grep -vx 'tiny-qwen2-vl' | paste -sd, -)"
: > "$OUT/checkpoints.tsv"
if [ -n "$RANDOM_MODELS" ]; then
  log "random checkpoints: $RANDOM_MODELS into $CKPT_DIR"
  if ! "$PY" "$REPO/scripts/goldens/random_checkpoints.py" --out "$CKPT_DIR" --models "$RANDOM_MODELS" > "$OUT/checkpoints.tsv" 2> "$OUT/checkpoints.log"; then
    log "random_checkpoints.py failed: $(tail -3 "$OUT/checkpoints.log")"; exit 1
  fi
fi
if echo "$MODELS" | tr ',' '\n' | grep -qx 'tiny-qwen2-vl'; then
  printf 'tiny-qwen2-vl\t%s\n' "$REPO/tests/fixtures/tiny-qwen2-vl" >> "$OUT/checkpoints.tsv"
fi

# 3. Speed, ours then the peer, per model.
PAIRS=()
while IFS=$'\t' read -r name dir; do
  [ -n "$name" ] || continue
  # A Qwen2-VL checkpoint gets the image workload on both sides (they pick it from config.json).
  MPT="$PT"
  if "$PY" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("model_type") != "qwen2_vl")' "$dir/config.json"; then
    MPT="$VPT"
  fi
  log "$name: bench paired (ours), $MPT prompt tokens"
  if ! "$BIN" bench paired --model "$dir" --device "$DEVICE" --dtype "$DTYPE" --prompt-tokens "$MPT" --new-tokens "$NT" \
       --reps "$REPS" --threads "$THREADS" --json "$OUT/$name.ours.json" > "$OUT/$name.ours.md" 2> "$OUT/$name.ours.log"; then
    log "$name: ours failed: $(tail -2 "$OUT/$name.ours.log")"
    echo "{\"error\": \"ours failed: $(tail -1 "$OUT/$name.ours.log" | tr -d '"\\' | cut -c1-300)\"}" > "$OUT/$name.ours.json"
  fi
  log "$name: transformers peer"
  PEER_DEV="$DEVICE"; [ "$CPU" = 1 ] || PEER_DEV="${DEVICE/auto/cuda}"
  if ! OMP_NUM_THREADS="$THREADS" "$PY" "$REPO/scripts/peer/hf_paired.py" --model-dir "$dir" --device "$PEER_DEV" --dtype "$DTYPE" \
       --prompt-tokens "$MPT" --new-tokens "$NT" --reps "$REPS" --threads "$THREADS" --json "$OUT/$name.peer.json" \
       > /dev/null 2> "$OUT/$name.peer.log"; then
    log "$name: peer failed: $(tail -2 "$OUT/$name.peer.log")"
    echo "{\"error\": \"peer failed: $(tail -1 "$OUT/$name.peer.log" | tr -d '"\\' | cut -c1-300)\"}" > "$OUT/$name.peer.json"
  fi
  PAIRS+=(--pair "$name" "$OUT/$name.ours.json" "$OUT/$name.peer.json")
done < "$OUT/checkpoints.tsv"

# 4. Report.
HEADER="$(date -u +%Y-%m-%dT%H:%M:%SZ), device \`$DEVICE\`${GPU_NAME:+ ($GPU_NAME)}, binary \`$BIN\`"
BI="$(dirname "$(dirname "$BIN")")/BUILD-INFO"
[ -f "$BI" ] && HEADER="$HEADER"$'\n\n'"Build: $(head -3 "$BI" | tr '\n' ' ')"
HEADER="$HEADER"$'\n\n'"Python: $("$PY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"
"$PY" "$REPO/scripts/peer/gpu_report.py" --out "$OUT/report.md" --header "$HEADER" --gpu-name "$GPU_NAME" \
  --goldens "${GOLDENS[@]}" "${PAIRS[@]}" > /dev/null || { log "report failed"; exit 1; }
log "report: $OUT/report.md"
exit "$FAILED"

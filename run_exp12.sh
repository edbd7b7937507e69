#!/usr/bin/env bash
# exp12 sweep: models × layers from an experiment file (text models first, then the VLM); each run
# evaluates every coefficient of the file beside one shared baseline, resumably
# (results/<experiment>/<model>/L<layer>.jsonl). Finished runs are skipped; a model whose weights
# are not on this machine is reported and skipped.
#
#   ./run_exp12.sh                     the whole sweep of experiments/exp12.toml
#   ./run_exp12.sh qwen-coder-0.5b     one model (any registry alias, directory or .gguf)
#   ./run_exp12.sh --quick             the quick main job (experiments/quick.toml: qwen-coder-0.5b,
#                                      4 tasks × 3 seeds), then the paired table
#   ./run_exp12.sh --shard i/n ...     run shard i of n of every run (merge shards with cat)
#   ./run_exp12.sh --slurm [--shards N] write and submit an sbatch job array of N shards
#   ./run_exp12.sh --experiment F.toml another experiment file
#   extra flags after `--` go to `miniwob-steer run` (e.g. -- --dtype gguf --concurrency 2)
#   RESULTS_DIR=DIR ./run_exp12.sh ... writes under DIR instead of results/
set -euo pipefail
cd "$(dirname "$0")"

EXPERIMENT=experiments/exp12.toml
QUICK=0
SHARD=""
SLURM=0
SHARDS=4
MODELS=()
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; EXPERIMENT=experiments/quick.toml ;;
    --experiment) EXPERIMENT="$2"; shift ;;
    --shard) SHARD="$2"; shift ;;
    --slurm) SLURM=1 ;;
    --shards) SHARDS="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) echo "run_exp12.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) MODELS+=("$1") ;;
  esac
  shift
done

TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/release/miniwob-steer"
if [ -z "${MINIWOB_STEER_BIN:-}" ]; then
  # cargo's own lines stream, so a first build is not ten silent minutes.
  echo "== building miniwob-steer (release: about 10 minutes on 2 cores from clean, seconds once built)" >&2
  cargo build --release -p miniwob-steer
else
  BIN="$MINIWOB_STEER_BIN"
fi

RESULTS="${RESULTS_DIR:-results}"
NAME=$(sed -n 's/^name *= *"\(.*\)".*/\1/p' "$EXPERIMENT" | head -1)
NAME=${NAME:-$(basename "$EXPERIMENT" .toml)}

if [ "$SLURM" = 1 ]; then
  mkdir -p "$RESULTS/$NAME"
  SCRIPT="$RESULTS/$NAME/slurm_array.sh"
  ARGS=""
  [ "$QUICK" = 1 ] && ARGS="--quick" || ARGS="--experiment $EXPERIMENT"
  for m in "${MODELS[@]+"${MODELS[@]}"}"; do ARGS="$ARGS $m"; done
  cat > "$SCRIPT" <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=$NAME
#SBATCH --array=0-$((SHARDS - 1))
#SBATCH --cpus-per-task=2
#SBATCH --output=$RESULTS/$NAME/slurm-%A_%a.out
# Each array task runs one shard of every run; shards merge by concatenation.
cd "$(pwd)"
RESULTS_DIR="$RESULTS" MINIWOB_STEER_BIN="$(pwd)/$BIN" ./run_exp12.sh $ARGS --shard "\$SLURM_ARRAY_TASK_ID/$SHARDS" ${EXTRA[@]+"-- ${EXTRA[*]}"}
EOF
  chmod +x "$SCRIPT"
  if command -v sbatch >/dev/null 2>&1; then
    sbatch "$SCRIPT"
    exit 0
  fi
  cat "$SCRIPT"
  echo "run_exp12.sh: sbatch not found on this machine: the job array script above was written to $SCRIPT but not submitted (copy the repository to a Slurm login node and run it there)" >&2
  exit 1
fi

INSTALLED=$("$BIN" models --json)
installed() {
  # Registry aliases: the `installed` flag of `models --json`; paths: they exist.
  if [ -e "$1" ]; then return 0; fi
  echo "$INSTALLED" | tr -d ' \n' | grep -q "\"alias\":\"$1\"[^}]*\"installed\":true"
}

SWEEP=$("$BIN" run --experiment "$EXPERIMENT" --print-sweep)
if [ ${#MODELS[@]} -gt 0 ]; then
  FILTERED=""
  for m in "${MODELS[@]}"; do
    LINES=$(echo "$SWEEP" | awk -F'\t' -v m="$m" '$1 == m' || true)
    if [ -z "$LINES" ]; then
      # A model outside the file: run it at the file's layers as a text model.
      LINES=$(echo "$SWEEP" | awk -F'\t' -v m="$m" '{print m "\t" $2 "\ttext"}' | sort -u)
    fi
    FILTERED="$FILTERED$LINES"$'\n'
  done
  SWEEP=$(echo "$FILTERED" | sed '/^$/d' | awk '!seen[$0]++')
fi

STATUS=0
SKIPPED=()
DONE=()
while IFS=$'\t' read -r MODEL LAYER MODALITY; do
  [ -z "$MODEL" ] && continue
  if ! installed "$MODEL"; then
    echo "== $MODEL: weights not available on this machine; skipped (./scripts/setup.sh --models $MODEL, or a local Hugging Face cache)" >&2
    SKIPPED+=("$MODEL (missing weights)")
    continue
  fi
  SAFE=$(echo "$MODEL" | tr -c 'A-Za-z0-9.\n-' '_')
  DIR="$RESULTS/$NAME/$SAFE"
  SUFFIX=""
  SHARD_ARGS=()
  if [ -n "$SHARD" ]; then
    SUFFIX=".shard-${SHARD/\//-of-}"
    SHARD_ARGS=(--shard "$SHARD")
  fi
  OUT="$DIR/L$LAYER$SUFFIX.jsonl"
  SUMMARY="$DIR/L$LAYER$SUFFIX.summary.json"
  if [ -f "$SUMMARY" ] && grep -q '"failed_pairs": 0' "$SUMMARY" \
     && [ "$(sed -n 's/.*"episodes": \([0-9]*\).*/\1/p' "$SUMMARY" | head -1)" = "$(sed -n 's/.*"planned_episodes": \([0-9]*\).*/\1/p' "$SUMMARY" | head -1)" ]; then
    echo "== $MODEL L$LAYER: finished ($SUMMARY); skipped"
    DONE+=("$OUT")
    continue
  fi
  VLM_ARGS=()
  [ "$MODALITY" = vlm ] && VLM_ARGS=(--vlm)
  echo "== $MODEL layer $LAYER ($MODALITY) → $OUT"
  if "$BIN" run --experiment "$EXPERIMENT" --model "$MODEL" --layer "$LAYER" "${VLM_ARGS[@]+"${VLM_ARGS[@]}"}" \
      "${SHARD_ARGS[@]+"${SHARD_ARGS[@]}"}" --out "$OUT" --summary-json "$SUMMARY" "${EXTRA[@]+"${EXTRA[@]}"}"; then
    DONE+=("$OUT")
  else
    echo "== $MODEL L$LAYER: run failed (rerun this script to resume)" >&2
    SKIPPED+=("$MODEL L$LAYER (failed)")
    STATUS=1
  fi
done <<< "$SWEEP"

if [ ${#SKIPPED[@]} -gt 0 ]; then
  echo "skipped: ${SKIPPED[*]}" >&2
fi

if [ "$QUICK" = 1 ] || [ ${#DONE[@]} -gt 0 ]; then
  ANALYZE="${ANALYZE:-}"
  for cand in "$TARGET/release/analyze" "${CARGO_TARGET_DIR:-/nonexistent}/release/analyze" "$(command -v analyze || true)"; do
    if [ -z "$ANALYZE" ] && [ -n "$cand" ] && [ -x "$cand" ]; then ANALYZE="$cand"; fi
  done
  if [ ${#DONE[@]} -gt 0 ]; then
    if [ -n "$ANALYZE" ]; then
      echo "== paired table (analyze)"
      "$ANALYZE" "$RESULTS/$NAME" --out "$RESULTS/$NAME/analysis" --no-plots || STATUS=1
      echo "== tables written to $RESULTS/$NAME/analysis/"
    else
      echo "== paired table (the analyze binary is not built: cargo build --release -p miniwob-steer-analysis; summaries from miniwob-steer run)"
      "$BIN" run --print-table "${DONE[@]}"
    fi
    echo "== results: ${DONE[*]}"
  fi
fi
exit $STATUS

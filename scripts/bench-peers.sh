#!/usr/bin/env bash
# The crate against PyTorch peers (Opacus 1.6 standard and ghost, a fastDP-style
# book-keeping ghost, DPZero, plain torch), interleaved process by process.
#
#   scripts/bench-peers.sh [--preset tiny[,small]] [--batch 32,128] [--rounds 2]
#                          [--steps 5] [--threads 2] [--device cpu|cuda] [--out DIR]
#
# Prints one markdown table (medians over rounds, ratios, peak memory) and writes
# DIR/peers.json, DIR/peers.md and the describe JSONs (default DIR: target/peers).
#
# Python: $DUALPRIV_PEERS_PYTHON if set (e.g. /work/venv/bin/python). Otherwise on a
# machine with a GPU the python3 that imports torch, with opacus installed from a
# carried wheel ($DUALPRIV_OPACUS_WHEEL, or benches/peers/wheels/opacus-*.whl) if it
# lacks it; on a CPU machine a venv of its own in DIR/venv (pip: opacus 1.6.0 and
# torch's CPU-only wheel from the PyTorch index, else PyPI's default wheel, ~5.6 GB).
# The crate: $DUALPRIV_BIN if set, else `cargo build --release` (with the cuda
# feature for --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/peers device=cpu
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    --device) device="${2:?--device needs cpu or cuda}"; args+=("$1" "$2"); shift 2 ;;
    --preset|--batch|--rounds|--steps|--threads)
      [[ $# -ge 2 ]] || { echo "bench-peers: $1 needs a value" >&2; exit 2; }
      args+=("$1" "$2"); shift 2 ;;
    --no-check) args+=("$1"); shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "bench-peers: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$device" in cpu|cuda) ;; *) echo "bench-peers: --device $device: use cpu or cuda" >&2; exit 2 ;; esac
mkdir -p "$out"

if [[ -n "${DUALPRIV_BIN:-}" ]]; then
  bin="$DUALPRIV_BIN"
  [[ -x "$bin" ]] || { echo "bench-peers: DUALPRIV_BIN=$bin is not an executable" >&2; exit 2; }
else
  feat=()
  [[ "$device" == cuda ]] && feat=(--features cuda)
  cargo build --release --bin dualpriv "${feat[@]}" >&2
  bin="${CARGO_TARGET_DIR:-target}/release/dualpriv"
fi

has_peers() { "$1" -c 'import torch, opacus' >/dev/null 2>&1; }

if [[ -n "${DUALPRIV_PEERS_PYTHON:-}" ]]; then
  py="$DUALPRIV_PEERS_PYTHON"
  has_peers "$py" || { echo "bench-peers: $py cannot import torch and opacus; pip install opacus==1.6.0 there, or unset DUALPRIV_PEERS_PYTHON" >&2; exit 2; }
elif [[ "$device" == cuda ]]; then
  py=python3
  "$py" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1 \
    || { echo "bench-peers: --device cuda needs a python3 whose torch sees a GPU (or set DUALPRIV_PEERS_PYTHON)" >&2; exit 2; }
  if ! has_peers "$py"; then
    wheel="${DUALPRIV_OPACUS_WHEEL:-$(ls benches/peers/wheels/opacus-*.whl 2>/dev/null | head -1)}"
    [[ -n "$wheel" && -f "$wheel" ]] || { echo "bench-peers: python3 has no opacus and no wheel was carried (set DUALPRIV_OPACUS_WHEEL)" >&2; exit 2; }
    # --no-deps: keep the machine's own torch.
    "$py" -m pip install --no-deps --user "$wheel" >&2
  fi
else
  venv="$out/venv"
  if ! has_peers "$venv/bin/python" 2>/dev/null; then
    echo "bench-peers: making a venv in $venv (CPU torch + opacus 1.6.0)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip >&2
    "$venv/bin/pip" install --quiet torch --index-url https://download.pytorch.org/whl/cpu >&2 \
      || "$venv/bin/pip" install --quiet torch >&2
    "$venv/bin/pip" install --quiet opacus==1.6.0 >&2
  fi
  py="$venv/bin/python"
fi

exec "$py" benches/peers/run.py --dualpriv "$bin" --python "$py" --out "$out" "${args[@]}"

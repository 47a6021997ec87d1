#!/usr/bin/env bash
# Runs dualpriv's GPU checks on a CUDA machine that has no Rust toolchain.
#
#   scripts/gpu-test.sh build [BUNDLE]        on a machine with Rust (no GPU needed):
#                                             builds the release test binaries and the
#                                             dualpriv binary with --features cuda, into
#                                             BUNDLE (default gpu-bundle/), stripped.
#   scripts/gpu-test.sh run BUNDLE OUTDIR     on the CUDA machine: finds libcublas.so.13,
#                                             runs every test binary and the kernel
#                                             benchmarks, writes logs and SUMMARY.md to OUTDIR.
#   scripts/gpu-test.sh all OUTDIR            both, on one machine that has Rust and a GPU.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

build() {
  local bundle="${1:-$root/gpu-bundle}"
  set -e
  cd "$root"
  eval "$(bash scripts/install-cuda-tools.sh)"
  rm -rf "$bundle" && mkdir -p "$bundle/tests"
  cargo build --release --features cuda --bin dualpriv
  cp target/release/dualpriv "$bundle/"
  cargo test --release --features cuda --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "$bundle/tests/$name"; done
  strip "$bundle/dualpriv" "$bundle"/tests/* 2>/dev/null || true
  # The torch peers (scripts/bench-peers.sh) in the repo layout it expects, and the
  # opacus wheel, which the GPU machine (no network) lacks.
  mkdir -p "$bundle/peers/scripts" "$bundle/peers/benches/peers/wheels"
  cp scripts/bench-peers.sh "$bundle/peers/scripts/"
  cp benches/peers/*.py "$bundle/peers/benches/peers/"
  python3 -m pip download --quiet --no-deps opacus==1.6.0 -d "$bundle/peers/benches/peers/wheels" ||
    echo "WARNING: could not download the opacus wheel; the GPU peer bench will fail"
  git rev-parse --short HEAD > "$bundle/COMMIT" 2>/dev/null || true
  du -sh "$bundle"
  ls "$bundle/tests"
}

find_cublas() {
  local d
  for d in ${LD_LIBRARY_PATH//:/ } /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
           /usr/lib/x86_64-linux-gnu /usr/lib64; do
    [ -e "$d/libcublas.so.13" ] && { echo "$d"; return 0; }
  done
  d=$(find /usr /opt -name 'libcublas.so.13*' -print -quit 2>/dev/null)
  [ -n "$d" ] && { dirname "$d"; return 0; }
  return 1
}

run() {
  local bundle="$1" out="$2"
  mkdir -p "$out"
  local lib
  if lib=$(find_cublas); then
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "libcublas.so.13 found in $lib"
  else
    echo "WARNING: libcublas.so.13 not found under /usr or /opt; cuBLAS tests will fail"
  fi
  {
    echo "# dualpriv GPU run"
    echo "date: $(date -u +%FT%TZ)"
    echo "commit: $(cat "$bundle/COMMIT" 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
    echo
    echo "| binary | result |"
    echo "|---|---|"
  } > "$out/SUMMARY.md"
  local fails=0 t name
  for t in "$bundle"/tests/*; do
    name=$(basename "$t")
    # A GPU run must not pass by skipping: a missing driver fails every GPU test.
    DUALPRIV_REQUIRE_GPU=1 timeout 300 "$t" --test-threads=1 --nocapture > "$out/test-$name.log" 2>&1
    local rc=$?
    local line
    line=$(grep -E '^test result:' "$out/test-$name.log" | tail -n 1)
    if grep -q 'skipped: no CUDA driver' "$out/test-$name.log"; then line="$line (GPU SKIPPED)"; fi
    [ $rc -ne 0 ] && fails=$((fails + 1)) && line="FAILED rc=$rc $line"
    echo "| $name | $line |" >> "$out/SUMMARY.md"
  done
  if "$bundle/dualpriv" bench-kernels --help >/dev/null 2>&1; then
    timeout 300 "$bundle/dualpriv" bench-kernels --backend cuda > "$out/bench-kernels.md" 2>&1 ||
      fails=$((fails + 1))
    { echo; echo "## bench-kernels --backend cuda"; cat "$out/bench-kernels.md"; } >> "$out/SUMMARY.md"
  fi
  # Whole-model runs on the CUDA backend: a short DP fine-tune of the tiny model,
  # then `dualpriv bench` on tiny and on llava-7b (LoRA r = 128, batch 4, every
  # method; the issue asks for all of it in under 3 minutes).
  local step
  for step in \
    "train-tiny|120|train --backend cuda --method dualpriv --init assets/tiny-pretrained --out $out/train-cuda --epsilon 3 --steps 25 --batch 128 --train-examples 8000" \
    "bench-tiny|120|bench --backend cuda --preset tiny --batch 32 --method all" \
    "bench-llava7b|240|bench --backend cuda --preset llava-7b --lora-rank 128 --batch 4 --method all --steps 3"; do
    IFS='|' read -r name secs args <<< "$step"
    local t0=$SECONDS
    # shellcheck disable=SC2086
    timeout "$secs" "$bundle/dualpriv" $args > "$out/$name.md" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && fails=$((fails + 1))
    { echo; echo "## $name (rc=$rc, $((SECONDS - t0)) s): dualpriv $args"; tail -n 20 "$out/$name.md"; } >> "$out/SUMMARY.md"
  done
  # The peer table on the GPU (issue 12 §3): tiny always; llava-7b (LoRA r = 128,
  # B = 4) and tinyllava-1b (B = 8) when DUALPRIV_GPU_PEERS_LARGE=1, as they need
  # several minutes of the session's device time.
  if [ -x "$bundle/peers/scripts/bench-peers.sh" ]; then
    local peers="tiny:32:180" spec preset batch secs
    [ "${DUALPRIV_GPU_PEERS_LARGE:-0}" = 1 ] && peers="$peers llava-7b:4:300 tinyllava-1b:8:240"
    for spec in $peers; do
      IFS=':' read -r preset batch secs <<< "$spec"
      local t0=$SECONDS
      DUALPRIV_BIN="$bundle/dualpriv" timeout "$secs" "$bundle/peers/scripts/bench-peers.sh" \
        --device cuda --preset "$preset" --batch "$batch" --rounds 2 --steps 3 \
        --out "$out/peers-$preset" > "$out/peers-$preset.log" 2>&1
      local rc=$?
      [ $rc -ne 0 ] && fails=$((fails + 1))
      { echo; echo "## peers $preset B=$batch (rc=$rc, $((SECONDS - t0)) s)"; tail -n 30 "$out/peers-$preset.log"; } >> "$out/SUMMARY.md"
    done
  fi
  echo "failures: $fails" >> "$out/SUMMARY.md"
  cat "$out/SUMMARY.md"
  return $(( fails > 0 ))
}

case "${1:-}" in
  build) build "${2:-}" ;;
  run) [ $# -eq 3 ] || { echo "usage: $0 run BUNDLE OUTDIR" >&2; exit 2; }; run "$2" "$3" ;;
  all) [ $# -eq 2 ] || { echo "usage: $0 all OUTDIR" >&2; exit 2; }; build "$root/gpu-bundle" && run "$root/gpu-bundle" "$2" ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac

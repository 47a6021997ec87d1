#!/usr/bin/env bash
# Runs the real kernels/model.cu on the CPU: one std::thread per CUDA thread, site-checked
# barriers and warp shuffles, NaN-poisoned shared memory, f64 references from
# src/backend/cpu.rs. For sessions without a GPU; not part of CI (it needs g++ and minutes).
#
#   tools/cuda-emu/run.sh [TEST|all]          TEST: layernorm rmsnorm rope heads softmax act
#                                             gelu_tail embedding xent patchify copy misc
#   tools/cuda-emu/run.sh noise               kernels/noise.cu: ChaCha20 vs RFC 8439, normals
#                                             bit for bit vs tests/noise.rs GOLDEN (seconds)
#   SANITIZE=thread|address tools/cuda-emu/run.sh all   (slower; sets EMU_SMALL=1)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/../.."
build="${TMPDIR:-/tmp}/dualpriv-cuda-emu"
mkdir -p "$build"
cp "$here/shim.h" "$here/harness.cpp" "$root/kernels/common.cuh" "$build/"
# `__shared__ T name[N];` becomes a per-block arena pointer; line numbers are kept so the
# barrier checks report model.cu's own lines.
sed -E 's/__shared__ ([A-Za-z_0-9]+) ([A-Za-z_0-9]+)\[([A-Za-z_0-9]+)\];/\1* \2 = emu_shared<\1>(\3, __LINE__);/' \
  "$root/kernels/model.cu" > "$build/model_emu.cu"
flags=(-std=c++20 -O1 -pthread -Wno-unknown-pragmas)
if [ "${1:-}" = noise ]; then
  # No __shared__ in noise.cu: compiled as is. No FMA contraction, as on the GPU
  # (the kernels use __dadd_rn / __dmul_rn).
  cp "$root"/kernels/{noise.cu,abi.h,gaussian.cuh,chacha.cuh,philox.cuh} "$here/noise_harness.cpp" "$build/"
  g++ "${flags[@]}" -ffp-contract=off -o "$build/emu_noise" "$build/noise_harness.cpp"
  exec "$build/emu_noise"
fi
case "${SANITIZE:-}" in
  thread) flags+=(-fsanitize=thread -g); export EMU_SMALL=1 ;;
  address) flags+=(-fsanitize=address,undefined -g); export EMU_SMALL=1 ;;
  "") ;;
  *) echo "SANITIZE must be thread or address" >&2; exit 2 ;;
esac
g++ "${flags[@]}" -o "$build/emu" "$build/harness.cpp"
"$build/emu" "${1:-all}"

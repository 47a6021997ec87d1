#!/usr/bin/env bash
# Runs the real kernels/*.cu on the CPU: one std::thread per CUDA thread, site-checked
# barriers and warp primitives, NaN-poisoned shared memory, against references written
# from the CPU twins. For sessions without a GPU; not part of CI (it needs g++ and, for
# the model kernels, minutes). tools/cuda-emu/X.cpp exercises kernels/X.cu.
#
#   tools/cuda-emu/run.sh clip | noise | prune | tokens    one DP kernel file (seconds each)
#   tools/cuda-emu/run.sh dp                               all four
#   tools/cuda-emu/run.sh [model] [TEST|all]               the model kernels: tensor, norms,
#                                                          rope, attention, activations,
#                                                          embedding, rows .cu (all: ~9 min on 2
#                                                          cores); TEST: layernorm rmsnorm rope
#                                                          heads softmax act gelu_tail embedding
#                                                          xent patchify copy misc
#   SANITIZE=thread|address tools/cuda-emu/run.sh ...      (slower; sets EMU_SMALL=1)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/../.."
build="${TMPDIR:-/tmp}/dualpriv-cuda-emu"
mkdir -p "$build"
cp "$here"/*.h "$here"/*.cpp "$root"/kernels/*.h "$root"/kernels/*.cuh "$build/"
flags=(-std=c++20 -O1 -pthread -Wno-unknown-pragmas)
case "${SANITIZE:-}" in
  thread) flags+=(-fsanitize=thread -g); export EMU_SMALL=1 ;;
  address) flags+=(-fsanitize=address,undefined -g); export EMU_SMALL=1 ;;
  "") ;;
  *) echo "SANITIZE must be thread or address" >&2; exit 2 ;;
esac

# kernels/X.cu -> $build/X_emu.cu with every `__shared__ T name[A][B];`, `T name[A];` or
# `T name;` turned into a per-block arena reference (emu_shared in shim.h). Line numbers
# are kept, so the barrier checks report the kernel file's own lines.
emu_source() {
  local ty='([A-Za-z_][A-Za-z_0-9 ]*[A-Za-z_0-9])' name='([A-Za-z_0-9]+)'
  sed -E \
    -e "s/__shared__ $ty $name\[([^]]+)\]\[([^]]+)\];/\1 (*\2)[\4] = reinterpret_cast<\1 (*)[\4]>(emu_shared<\1>((\3) * (\4), __LINE__));/" \
    -e "s/__shared__ $ty $name\[([^]]+)\];/\1* \2 = emu_shared<\1>(\3, __LINE__);/" \
    -e "s/__shared__ $ty $name;/\1\& \2 = *emu_shared<\1>(1, __LINE__);/" \
    "$root/kernels/$1.cu" > "$build/$1_emu.cu"
}

# The DP kernels: bit-exact paths (__fadd_rn, __dmul_rn, ...), so no FMA contraction,
# as the intrinsics promise on the GPU.
run_dp() {
  emu_source "$1"
  g++ "${flags[@]}" -ffp-contract=off -o "$build/emu_$1" "$build/$1.cpp"
  "$build/emu_$1"
}

case "${1:-all}" in
  clip | noise | prune | tokens) run_dp "$1" ;;
  dp) for k in clip noise prune tokens; do echo "== $k"; run_dp "$k"; done ;;
  *)
    [ "${1:-}" = model ] && shift
    # One translation unit over the model's kernel files, each keeping its own line
    # numbers for the barrier checks.
    : > "$build/model_emu.cu"
    for k in tensor norms rope attention activations embedding rows; do
      emu_source "$k"
      printf '#include "%s_emu.cu"\n' "$k" >> "$build/model_emu.cu"
    done
    g++ "${flags[@]}" -o "$build/emu_model" "$build/model.cpp"
    "$build/emu_model" "${1:-all}"
    ;;
esac

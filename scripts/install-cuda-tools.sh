#!/usr/bin/env bash
# Installs the pinned nvcc 13.0 toolchain from PyPI wheels into a project-local,
# git-ignored folder (.cuda-tools/), so the `cuda` feature builds without a system CUDA.
# 13.0 is pinned because the H200 driver (580) is CUDA 13.0: PTX from a newer nvcc
# fails there with CUDA_ERROR_UNSUPPORTED_PTX_VERSION.
# Idempotent: a second run only checks the stamp and prints the environment line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${DUALPRIV_CUDA_TOOLS:-$root/.cuda-tools}"
pins=(
  "nvidia-cuda-nvcc==13.0.*"
  "nvidia-nvvm==13.0.*"
  "nvidia-cuda-runtime==13.0.*"
  "nvidia-cuda-crt==13.0.*"
  "nvidia-cuda-cccl==13.0.*"
)
stamp="$dest/.installed"
want="$(printf '%s\n' "${pins[@]}")"
cuda_home="$dest/nvidia/cu13"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x "$cuda_home/bin/nvcc" ]; then
  echo "install-cuda-tools: installing ${pins[*]} into $dest" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --upgrade --target "$dest" "${pins[@]}"
  printf '%s' "$want" > "$stamp"
fi
nvcc="$cuda_home/bin/nvcc"
if [ ! -x "$nvcc" ]; then
  echo "install-cuda-tools: expected $nvcc after install; the wheel layout changed" >&2
  exit 1
fi
"$nvcc" --version | tail -n 2 >&2
echo "export CUDA_HOME=$cuda_home NVCC=$nvcc"

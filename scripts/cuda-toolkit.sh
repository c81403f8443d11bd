#!/usr/bin/env bash
# The CUDA 13.0 toolchain from pinned PyPI wheels, for building Sluice's `cuda` feature on a machine
# with no CUDA install and no GPU (CI, laptops). Idempotent; cached under the user's cache folder.
#
#   eval "$(scripts/cuda-toolkit.sh)"          # nvcc + headers: enough for `cargo check --features cuda`
#   eval "$(scripts/cuda-toolkit.sh --link)"   # + cuBLAS, cuRAND, NVRTC, a libcuda stub: `cargo build`
#
# Prints `export` lines on stdout (progress goes to stderr) and writes the same lines to
# $SLUICE_CUDA_ROOT/env.sh. Snags it fixes, each one noted where it is fixed:
#   - the wheels ship only versioned `.so` names, which `-lcudart` and friends cannot find;
#   - no wheel ships `libcuda.so` (it comes with the driver), so linking needs a stub;
#   - without CUDA_COMPUTE_CAP, candle-kernels' build script calls `nvidia-smi`;
#   - cudarc's build script reads CUDA_HOME / CUDA_PATH, cudaforge reads NVCC or PATH;
#   - nvcc newer than 13.0 emits PTX (ISA > 9.0) that a 580 driver may refuse, hence the pins.
set -euo pipefail

# --- Pins: one CUDA release, 13.0 (PTX ISA 9.0, loadable by driver 580 and newer) -----------------
CHECK_PINS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85"
LINK_PINS="nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88"

link=0
case "${1:-}" in
    --link) link=1 ;;
    "") ;;
    *) echo "usage: $0 [--link]" >&2; exit 2 ;;
esac

ROOT="${SLUICE_CUDA_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice/cuda-13.0}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$ROOT"

# One installer at a time (two `make` runs may race on a cold cache).
if command -v flock >/dev/null; then
    exec 9>"$ROOT/.lock"
    flock 9
fi

# Installs `pins` with pip into $ROOT/<name>, unless the same pins are already there. pip writes to a
# fresh folder that is renamed into place, so an interrupted install never looks finished.
install_wheels() {
    local name="$1" pins="$2" dest="$ROOT/$1"
    if [[ -f "$dest/.pins" && "$(cat "$dest/.pins")" == "$pins" ]]; then
        return
    fi
    echo "cuda-toolkit: installing $name wheels into $dest" >&2
    local tmp="$dest.tmp.$$"
    rm -rf "$tmp"
    # shellcheck disable=SC2086 # the pins are a word list on purpose
    PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check \
        --no-deps --only-binary=:all: --target "$tmp" $pins >&2
    printf '%s' "$pins" >"$tmp/.pins"
    rm -rf "$dest"
    mv "$tmp" "$dest"
}

install_wheels check "$CHECK_PINS"
# Every wheel installs under site-packages/nvidia/cu13/{bin,include,lib,nvvm}: a toolkit layout.
CUDA_ROOT_DIR="$ROOT/check/nvidia/cu13"
"$CUDA_ROOT_DIR/bin/nvcc" --version | grep -q "release 13.0," || {
    echo "cuda-toolkit: $CUDA_ROOT_DIR/bin/nvcc is not CUDA 13.0" >&2
    exit 1
}

# Snag: only `libfoo.so.N` ships; the linker's `-lfoo` looks for `libfoo.so`.
link_unversioned() {
    local dir="$1" lib base
    for lib in "$dir"/lib*.so.*; do
        [[ -e "$lib" ]] || continue
        base="${lib%%.so.*}.so"
        [[ -e "$base" ]] || ln -sf "$(basename "$lib")" "$base"
    done
}
link_unversioned "$CUDA_ROOT_DIR/lib"

lib_path="$CUDA_ROOT_DIR/lib"
if [[ $link == 1 ]]; then
    install_wheels link "$LINK_PINS"
    link_unversioned "$ROOT/link/nvidia/cu13/lib"
    # Snag: no wheel has libcuda (the driver's library). Link against a stub with the driver API's
    # symbol names and the real soname, so the binary loads the driver's libcuda.so.1 at run time.
    # It goes in lib/stubs, where a real toolkit keeps its own; never put it on LD_LIBRARY_PATH.
    # Should it be loaded anyway, every call returns CUDA_ERROR_NO_DEVICE (100): "no GPU", no crash.
    stubs="$CUDA_ROOT_DIR/lib/stubs"
    mkdir -p "$stubs"
    # Every `cu*(` name in the 13.0 header after macro expansion (so `cuMemAlloc` is already
    # `cuMemAlloc_v2`), plus every name cudarc's bindings load, when its source is at hand.
    {
        "${CC:-cc}" -E -P -I"$CUDA_ROOT_DIR/include" "$CUDA_ROOT_DIR/include/cuda.h" |
            grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' ('
        find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path '*/cudarc-*/src/driver/sys/mod.rs' \
            -exec grep -ohE 'load::<_F>\("cu[A-Za-z0-9_]+"\)' {} + 2>/dev/null | grep -oE 'cu[A-Za-z0-9_]+' || true
    } | sort -u | sed 's/.*/int &(void) { return 100; }/' >"$stubs/libcuda-stub.c.new"
    if [[ -f "$stubs/libcuda.so" ]] && cmp -s "$stubs/libcuda-stub.c.new" "$stubs/libcuda-stub.c"; then
        rm "$stubs/libcuda-stub.c.new"
    else
        mv "$stubs/libcuda-stub.c.new" "$stubs/libcuda-stub.c"
        "${CC:-cc}" -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so.tmp" "$stubs/libcuda-stub.c"
        mv "$stubs/libcuda.so.tmp" "$stubs/libcuda.so"
    fi
    lib_path="$lib_path:$ROOT/link/nvidia/cu13/lib:$stubs"
fi

# The environment, written once so `make` and people can source it. CUDA_COMPUTE_CAP keeps a
# caller's value (snag: unset, the build calls nvidia-smi); 90 is the H100/H200.
env_file="$ROOT/env.sh"
[[ $link == 1 ]] && env_file="$ROOT/env-link.sh"
cat >"$env_file.tmp" <<EOF
export CUDA_HOME="$CUDA_ROOT_DIR"
export CUDA_PATH="$CUDA_ROOT_DIR"
export NVCC="$CUDA_ROOT_DIR/bin/nvcc"
export PATH="$CUDA_ROOT_DIR/bin:\$PATH"
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$lib_path\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
EOF
mv "$env_file.tmp" "$env_file"
cat "$env_file"

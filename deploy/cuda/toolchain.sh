#!/usr/bin/env bash
# The CUDA toolchain for `cargo build --features cuda`, from PyPI into target/cuda (no system
# install, no GPU needed): nvcc 13.4 and the headers and libraries candle's kernels need, as
# one CUDA_HOME, target/cuda/home.
#
# candle 0.11's cudarc links the driver (libcuda), cuBLAS, cuBLASLt and cuRAND dynamically.
# None of those is needed to build, only to run, so this links against stubs: shared
# libraries with the real sonames whose functions are the names cudarc itself declares
# (NVIDIA's toolkit ships the same kind of stub for libcuda). At run time the dynamic loader
# finds the GPU machine's real libraries instead (LD_LIBRARY_PATH; bench/gpu/check.py sets it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
CUDA=13.4.92
root=target/cuda
home=$root/home
rm -rf "$root/py" "$home"
mkdir -p "$root"
"$PYTHON" -m pip install --quiet --no-deps --target "$root/py" \
  nvidia-cuda-nvcc==$CUDA nvidia-cuda-crt==$CUDA nvidia-cuda-runtime==$CUDA \
  nvidia-nvvm==$CUDA nvidia-cuda-nvrtc==$CUDA nvidia-cuda-cccl==13.3.3.4.1
ln -s py/nvidia/cu13 "$home"
lib=$home/lib
ln -sf libcudart.so.13 "$lib/libcudart.so"
ln -sf libnvrtc.so.13 "$lib/libnvrtc.so"

# cudarc's declarations of each library's functions, from the crate in cargo's registry.
cudarc=$(cargo metadata --format-version 1 --manifest-path server/Cargo.toml --features cuda 2>/dev/null |
  "$PYTHON" -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')
mkdir -p "$lib/stubs"
stub() { # stub <module> <soname> <link name>
  local src=$root/stub-$1.c
  grep -ohP '^\s+fn \K\w+(?=\()' "$cudarc/src/$1/sys/mod.rs" | sort -u |
    sed 's/.*/void &(void) {}/' > "$src"
  cc -shared -fPIC -Wl,-soname,"$2" -o "$lib/stubs/$3" "$src"
}
stub driver libcuda.so.1 libcuda.so
stub cublas libcublas.so.13 libcublas.so
stub cublaslt libcublasLt.so.13 libcublasLt.so

# cuRAND: PyTorch's CUDA 13 wheels do not ship it, and candle makes a generator when it
# opens a device (graft never draws random numbers on the GPU). This one links, and on a
# GPU machine without the real library it is the fallback bench/gpu/check.py puts on the
# library path: a generator that can be made, seeded and dropped, and every draw fails
# with CURAND_STATUS_NOT_INITIALIZED (100), which candle reports as an error.
src=$root/stub-curand.c
{
  echo 'int curandCreateGenerator(void **g, int kind) { (void)kind; *g = (void *)1; return 0; }'
  for ok in curandSetStream curandSetPseudoRandomGeneratorSeed curandSetGeneratorOffset curandDestroyGenerator; do
    echo "int $ok(void) { return 0; }"
  done
  grep -ohP '^\s+fn \K\w+(?=\()' "$cudarc/src/curand/sys/mod.rs" | sort -u |
    grep -vxE 'curandCreateGenerator|curandSetStream|curandSetPseudoRandomGeneratorSeed|curandSetGeneratorOffset|curandDestroyGenerator' |
    sed 's/.*/int &(void) { return 100; }/'
} > "$src"
cc -shared -fPIC -Wl,-soname,libcurand.so.10 -o "$lib/stubs/libcurand.so" "$src"
"$home/bin/nvcc" --version | tail -2
echo "CUDA toolchain ready: CUDA_HOME=$home"

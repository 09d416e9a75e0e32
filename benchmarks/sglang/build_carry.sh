#!/usr/bin/env bash
# Builds, from the package index, what SGLang 0.5.23 needs to run on the lent GPU
# machine (torch 2.11 + CUDA 13, triton 3.6, transformers 5.17, Python 3.12, no
# network): ~39 MB, under the 64 MiB a device call carries.
#   usage: bash benchmarks/sglang/build_carry.sh .sglang-carry   (OUTDIR inside the repo, git-ignored)
#   (the project's copy of ../shared/sglang-gpu/build_carry.sh; benchmarks/sglang/README.md)
# Then on the device:  eval "$(bash OUTDIR/install.sh)"  (unpacks, prints the environment).
# Seen on the lent H100 (2026-12-07): sgl.Engine(model_path=<tiny random Llama>,
#   attention_backend="triton", sampling_backend="pytorch", grammar_backend="none",
#   disable_cuda_graph=True, bf16_gemm_backend="torch", disable_flashinfer_autotune=True)
#   started in 45 s and generated; run it under `if __name__ == "__main__":` (it spawns
#   its scheduler). CUDA graphs, larger models and the plugin: not yet tried there.
# What it holds, and why:
#   sglang-0.5.23-slim.zip   the sglang package minus multimodal_gen/, test/, benchmark/
#                            and its Rust .so files (their libtorch is 2.14's; the Python
#                            radix-tree core is used instead)
#   sglang_kernel-slim.zip   sglang-kernel 0.4.5 (built for torch 2.11, CUDA 13): Python
#                            files + sm90/common_ops only (its 342 MB FA3 library dropped)
#   whl/                     the 25 wheels SGLang imports that the GPU image lacks
set -euo pipefail
out=${1:?usage: build_carry.sh OUTDIR}
mkdir -p "$out/whl"; tmp=$(mktemp -d)
py="--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --only-binary=:all:"
for t in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do py="$py --platform ${t}_x86_64"; done
py="$py --platform any"
pip download -q --no-deps $py -d "$tmp" sglang==0.5.23 sglang-kernel==0.4.5
pip download -q --no-deps $py -d "$out/whl" \
  annotated-types==0.8.0 apache-tvm-ffi==0.1.11 compressed-tensors==0.18.0 dill==0.4.1 \
  distro==1.9.0 fastapi==0.165.0 gguf==0.19.0 ipython==9.19.1 loguru==0.8.0 \
  msgspec==0.23.0 openai==2.8.0 opentelemetry-api==1.45.3 orjson==3.13.0 \
  partial-json-parser==0.2.1.1.post7 pybase64==1.5.1 pydantic==2.14.4 \
  pydantic-core==2.50.5 pyzmq==27.3.0 setproctitle==1.3.8 sniffio==1.3.1 \
  starlette==1.10.0 traitlets==5.16.1 typing-inspection==0.4.5 uvicorn==0.55.0 \
  xgrammar==0.2.7
python3 - "$tmp" "$out" <<'PY'
import sys, zipfile, glob, os
tmp, out = sys.argv[1:]
def slim(src, dst, keep):
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as o:
        for n in z.namelist():
            if keep(n):
                o.writestr(n, z.read(n))
sg = glob.glob(f"{tmp}/sglang-0.5.23-*.whl")[0]
slim(sg, f"{out}/sglang-0.5.23-slim.zip", lambda n: not (
    n.startswith(("sglang/multimodal_gen/", "sglang/test/", "sglang/benchmark/")) or n.endswith(".so")))
sk = glob.glob(f"{tmp}/sglang_kernel-0.4.5-*.whl")[0]
slim(sk, f"{out}/sglang_kernel-slim.zip", lambda n: not n.endswith(".so")
     or n.endswith(("sm90/common_ops.abi3.so", "spatial_ops.abi3.so")))
PY
cat > "$out/install.sh" <<'SH'
#!/usr/bin/env bash
# On the device: unpack into /tmp/sgl-site and print the environment to use.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); site=/tmp/sgl-site; mkdir -p "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$here"/whl/*.whl
python3 -m zipfile -e "$here/sglang-0.5.23-slim.zip" "$site"
python3 -m zipfile -e "$here/sglang_kernel-slim.zip" "$site"
# sglang's Llama MLP imports a CuTe DSL kernel (package cutlass, not carried) before it
# checks for SM100; on Hopper that kernel is never used: check the architecture first.
python3 - "$site/sglang/srt/layers/dual_gemm.py" <<'PY'
import sys; p = sys.argv[1]; s = open(p).read()
old = "        if not is_cuda():\n            return None\n"
new = old + "        from sglang.srt.utils import is_sm100_supported\n        if not is_sm100_supported():\n            return None\n"
if new not in s:
    assert old in s, "dual_gemm.py changed: re-check the SM100 guard"
    open(p, "w").write(s.replace(old, new, 1))
PY
echo "export PYTHONPATH=$site:\${PYTHONPATH:-} SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1 SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python"
SH
chmod +x "$out/install.sh"; rm -rf "$tmp"; du -sh "$out"

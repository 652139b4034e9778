#!/usr/bin/env bash
# Build FlashAttention 3 (hopper/) forward kernels, head dim 128, bf16 + e4m3, sm_90a; wheel to $OUT.
# Source: .fa3/src.tar.gz = flash-attention/hopper at Dao-AILab/flash-attention 0251105a plus
# flash-attention/csrc/cutlass/{include,tools/util/include} at NVIDIA/cutlass 7127592 (the submodule
# commit); carried to the device with `carry: [".fa3"]`. Run there: `bash bench/fa3_build.sh`, then
# `pip install --no-deps --target /tmp/fa3site /tmp/fa3/flash-attention/hopper/dist/*.whl` and
# `PYTHONPATH=/tmp/fa3site:. python bench/fa3_fp8_probe.py`.
set -euo pipefail
W=/tmp/fa3; rm -rf $W; mkdir -p $W; tar -C $W -xzf .fa3/src.tar.gz; echo FA3 > $W/flash-attention/README.md
command -v nvcc || export PATH=/usr/local/cuda/bin:$PATH
nvcc --version | tail -2
export FLASH_ATTENTION_DISABLE_BACKWARD=TRUE FLASH_ATTENTION_DISABLE_SPLIT=TRUE FLASH_ATTENTION_DISABLE_PAGEDKV=TRUE \
  FLASH_ATTENTION_DISABLE_APPENDKV=TRUE FLASH_ATTENTION_DISABLE_LOCAL=TRUE FLASH_ATTENTION_DISABLE_SOFTCAP=TRUE \
  FLASH_ATTENTION_DISABLE_PACKGQA=TRUE FLASH_ATTENTION_DISABLE_FP16=TRUE FLASH_ATTENTION_DISABLE_VARLEN=TRUE \
  FLASH_ATTENTION_DISABLE_CLUSTER=TRUE FLASH_ATTENTION_DISABLE_HDIM64=TRUE FLASH_ATTENTION_DISABLE_HDIM96=TRUE \
  FLASH_ATTENTION_DISABLE_HDIM192=TRUE FLASH_ATTENTION_DISABLE_HDIM256=TRUE FLASH_ATTENTION_DISABLE_SM80=TRUE \
  FLASH_ATTENTION_DISABLE_HDIMDIFF64=TRUE FLASH_ATTENTION_DISABLE_HDIMDIFF192=TRUE MAX_JOBS=16 NVCC_THREADS=2
cd $W/flash-attention/hopper
FLASH_ATTENTION_FORCE_BUILD=TRUE python setup.py -q bdist_wheel > $OUT/build.log 2>&1 || { grep -m3 -B3 -A12 " error" $OUT/build.log | cut -c1-400; exit 1; }
ls -la dist; cp dist/*.whl "$OUT"/

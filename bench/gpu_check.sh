#!/usr/bin/env bash
# Every GPU check in one call, for a lent GPU machine: each step (FSDP too) through NCCL, then minGPT
# throughput and MFU (bf16, with and without torch.compile, default and GPT-2 small shapes).
#
#   bash bench/gpu_check.sh path/to/tinyshakespeare.txt            # on a CUDA machine
#   DEVICE=cpu NPROC=2 CASES=cpu-small bash bench/gpu_check.sh FILE  # the same script, smoke-tested on CPU
#
# Logs and the throughput table land in bench/results/ (and in $OUT too, when it is set).
set -euo pipefail
data=$(realpath "${1:?usage: bash bench/gpu_check.sh path/to/tinyshakespeare.txt}")
device=${DEVICE:-cuda}
nproc=${NPROC:-gpu}
repo=$(cd "$(dirname "$0")/.." && pwd)
results=$repo/bench/results
work=$(mktemp -d)
mkdir -p "$results"
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 PYTHONUNBUFFERED=1

cd "$work"
{
    date -u
    if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
    python -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| GPUs', torch.cuda.device_count())"
    python "$repo/single_gpu.py" 5 5 --device "$device"
    python "$repo/multigpu.py" 5 5 --device "$device"
    torchrun --standalone --nproc_per_node="$nproc" "$repo/multigpu_torchrun.py" 5 5 --device "$device"
    torchrun --standalone --nproc_per_node="$nproc" "$repo/multinode.py" 5 5 --device "$device" --snapshot_path step4_snapshot.pt
    torchrun --standalone --nproc_per_node="$nproc" "$repo/fsdp.py" 5 5 --device "$device" --snapshot_path step6_snapshot.dcp
    torchrun --standalone --nproc_per_node="$nproc" "$repo/fsdp.py" 1 1 --device "$device" --workload images --data_dir fake --snapshot_path step6_images.dcp
} 2>&1 | tee "$results/gpu_check_steps.log"
# shellcheck disable=SC2086  # CASES is a list of words
python "$repo/bench/mingpt_throughput.py" --data "$data" ${CASES:+--cases $CASES} 2>&1 | tee "$results/gpu_check_mingpt.log"
if [ -n "${OUT:-}" ]; then cp "$results"/gpu_check_*.log "$results"/mingpt_*.md "$OUT"/; fi

#!/usr/bin/env bash
# The GPU checks, in parts that each fit one call of a lent GPU machine (10 minutes), run one by one:
#
#   bash bench/gpu_check.sh PART...                # on a CUDA machine; PART is steps, mingpt, compile or gpt2
#   DEVICE=cpu bash bench/gpu_check.sh PART...     # smoke run on CPU: 2 processes, tiny shapes, same code paths
#
#   part     what it runs                                                         estimate, one H100
#   steps    every step script through NCCL (FSDP on toy and images), preflight   ~2 min
#   mingpt   minGPT throughput and MFU, eager: default, default+fsdp              ~3 min
#   compile  minGPT default+compile (needs a C compiler for Triton)               ~3 min
#   gpt2     minGPT in GPT-2 small shapes, compiled, ~3,100 steps (C compiler)    ~5 min
#
# Estimates, as no GPU has run these yet: the training FLOPs of each case (the model's
# flops_per_token x the tokens of its share of Tiny Shakespeare's 1,115,394 characters) at 20% MFU
# of the H100's dense bf16 989 TFLOP/s, a third of that per token of the test set, 15 s to start
# each run, 2 min per compilation. default: 25.3M parameters, 158 MFLOP/token, 1,393 steps of
# 216 x 128 = 38.5M tokens = 6.1 PFLOP: 32 s (64 s at 10% MFU), the fsdp case up to twice that.
# gpt2: 85.9M parameters, 629 MFLOP/token, 3,073 steps of 16 x 1024 = 50.3M tokens = 31.7 PFLOP:
# 165 s, ~5 min in all; under 8 minutes unless its MFU falls below 10%. steps: 7 short runs of
# ~15 s, the images one ~20 s more.
#
# Each part prints its table as it goes and writes it to
# $RESULTS/gpu_check_<part>_<card>.md, every line of output to gpu_check_<part>_<card>.log beside it
# (RESULTS: bench/results on CUDA, /tmp/gpu_check_smoke on CPU), and copies both to $OUT when set.
# DATA is the text for minGPT (default: ../shared/data/tinyshakespeare.txt beside the repository);
# NPROC the processes (default: every GPU; 2 on CPU); PYTHON the interpreter (default: python3).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$(command -v python3 || command -v python)}  # a lent GPU machine has python3, maybe no python
device=${DEVICE:-cuda}
data=${DATA:-$repo/../shared/data/tinyshakespeare.txt}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 PYTHONUNBUFFERED=1
if [ "$device" = cpu ]; then
    nproc=${NPROC:-2}
    results=${RESULTS:-/tmp/gpu_check_smoke}
    export OMP_NUM_THREADS=1  # one core per process
    # Tiny shapes, added after each case's own: the cases' code paths in seconds.
    tiny=(gpt_config.n_layer=1 gpt_config.n_head=2 gpt_config.n_embd=32 data_config.block_size=32 trainer_config.batch_size=8
          data_config.truncate=0.005 trainer_config.log_every=5)
else
    nproc=${NPROC:-gpu}
    results=${RESULTS:-$repo/bench/results}
    tiny=()
fi
usage="usage: bash bench/gpu_check.sh PART... (PART: steps, mingpt, compile, gpt2); DEVICE=cpu for a smoke run on CPU"

fail() {  # one line on stderr, exit 1
    echo "error: $*" >&2
    exit 1
}

card() {  # the card's name (CPU on CPU), as the tables' headings give it, and its file-name form
    "$py" - "$device" "$repo/bench" <<'EOF'
import sys
import torch
sys.path.insert(0, sys.argv[2])
from mingpt_throughput import device_slug
if sys.argv[1] == "cpu":
    print("CPU\ncpu")
elif not torch.cuda.is_available():
    sys.exit("error: no CUDA GPU is visible; DEVICE=cpu runs the parts on CPU")
else:
    name = torch.cuda.get_device_name(0)
    print(f"{name}\n{device_slug(name)}")
EOF
}

compiler() {  # what torch.compile's kernels are built with: Triton's C compiler on CUDA ($CC, else gcc or clang),
              # Inductor's C++ one on CPU ($CXX, else g++); empty if it is missing
    local cc
    if [ "$device" = cpu ]; then cc=${CXX:-g++}; else cc=${CC:-$(command -v gcc || command -v clang || true)}; fi
    if [ -n "$cc" ] && command -v "$cc" >/dev/null; then echo "$cc"; fi
}

step() {  # NAME COMMAND...: run one script; a table row with its exit status, seconds and last epoch line
    local name=$1 start=$SECONDS status=0 out
    shift
    out=$(mktemp)
    "$@" >"$out" 2>&1 || status=$?
    cat "$out" >>"$log"
    local last
    last=$(grep -E "Epoch [0-9]+/|^preflight: " "$out" | tail -1 || tail -1 "$out")
    echo "| $name | $status | $((SECONDS - start)) | $(cut -c1-200 <<<"$last" | sed 's/|/\\|/g') |" | tee -a "$table"
    rm -f "$out"
    [ "$status" = 0 ] || failed=1
}

steps() {
    local run=("$py" -m torch.distributed.run --standalone --nproc_per_node="$nproc")
    echo "| run | exit | seconds | last line |" | tee -a "$table"
    echo "| --- | ---: | ---: | --- |" | tee -a "$table"
    step single_gpu "$py" "$repo/single_gpu.py" 5 5 --device "$device"
    step multigpu "$py" "$repo/multigpu.py" 5 5 --device "$device"
    step multigpu_torchrun "${run[@]}" "$repo/multigpu_torchrun.py" 5 5 --device "$device"
    step multinode "${run[@]}" "$repo/multinode.py" 5 5 --device "$device" --snapshot_path step4_snapshot.pt
    step fsdp "${run[@]}" "$repo/fsdp.py" 5 5 --device "$device" --snapshot_path step6_snapshot.dcp
    step fsdp_images "${run[@]}" "$repo/fsdp.py" 1 1 --device "$device" --workload images --data_dir fake --snapshot_path step6_images.dcp
    step preflight "${run[@]}" "$repo/tools/preflight.py"
}

mingpt() {  # CASE...: minGPT's throughput benchmark; its table (a heading with the card, a row per case) into this part's
    local procs=() out
    if [ "$nproc" != gpu ]; then procs=(--nproc "$nproc"); fi
    out=$(mktemp)
    "$py" "$repo/bench/mingpt_throughput.py" --data "$data" --cases "$@" --out "$out" "${procs[@]}" \
        ${tiny[@]+--extra "${tiny[@]}"} 2>&1 | sed '/^written to /d' | tee -a "$log" || failed=1
    cat "$out" >>"$table"
    rm -f "$out"
}

compiled() {  # CASE...: as mingpt, once a compiler is there for torch.compile
    local cc
    cc=$(compiler)
    if [ -z "$cc" ]; then
        local needs="a C compiler for Triton's GPU kernels (gcc or clang, or CC=...)"
        if [ "$device" = cpu ]; then needs="a C++ compiler for Inductor's CPU kernels (g++, or CXX=...)"; fi
        echo "$part: not run: torch.compile needs $needs, and there is none here" | tee -a "$table" >&2
        failed=1
        return
    fi
    echo "compiler: $cc" >>"$log"
    mingpt "$@"
}

[ $# -gt 0 ] || fail "$usage"
for part in "$@"; do
    case $part in
        steps) ;;
        mingpt | compile | gpt2)
            [ -f "$data" ] || fail "no text for minGPT at $data; download Tiny Shakespeare there or set DATA=path/to/tinyshakespeare.txt" ;;
        *) fail "unknown part '$part'; $usage" ;;
    esac
done
info=$(card) || exit 1
name=${info%$'\n'*} slug=${info#*$'\n'}
mkdir -p "$results"
status=0
cd "$(mktemp -d)"  # the runs' snapshots and metrics go to a scratch folder
for part in "$@"; do
    table=$results/gpu_check_${part}_$slug.md
    log=$results/gpu_check_${part}_$slug.log
    : >"$log"
    echo "gpu_check $part on $name, $(date -u +%F), torch $("$py" -c 'import torch; print(torch.__version__)'): $table" | tee "$table"
    echo | tee -a "$table"
    failed=0
    case $part in
        steps) steps ;;
        mingpt) mingpt default default+fsdp ;;
        compile) compiled default+compile ;;
        gpt2) compiled gpt2-small+compile ;;
    esac
    if [ -n "${OUT:-}" ]; then cp "$table" "$log" "$OUT"/; fi
    [ "$failed" = 0 ] || status=1
done
exit $status

#!/usr/bin/env bash
# One short device check (one GPU), in priority order within a time budget (GPU_CHECK_BUDGET seconds, default
# 540: the whole script ends within about 9 minutes; a step gets at most what is left, and one with under 20 s
# left is skipped and says so): first issue 18's training step (its test of one host read per optimizer step on
# CUDA, then the benchmark: `small` and `base` AIM pretraining at 224 px in bf16, eager and compiled in the default
# and reduce-overhead modes, each against HF GPT-2 in the same mode, with torch.profiler kernel tables in
# OUTDIR/profile), then the CUDA-only tests, the sampling and iGPT
# benchmarks on CUDA, then the library's own CUDA paths end to end (bf16 training with gradient accumulation,
# torchrun/NCCL, generation + sampling, detection, torch.compile).
# Run from the repository root: bash benchmarks/gpu_check.sh OUTDIR (logs, JSON and profiles go there).
set -u -o pipefail
OUT=${1:-gpu_out}; mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-540}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=python3
[ -d wheels ] && $PY -m pip install -q --no-index --no-deps wheels/*.whl  # pycocotools (detection mAP), carried
nvidia-smi -L | tee "$OUT/env.txt"
$PY -c "import torch, transformers; print(torch.__version__, transformers.__version__)" | tee -a "$OUT/env.txt"
# Each step's output goes to its own log under /tmp and is appended to $OUT/steps.log (few files come back).
step() { local name=$1 t=$2; shift 2; local t0=$SECONDS log=/tmp/gpu_check_$name.log left=$((BUDGET - SECONDS))
         if [ "$left" -lt 20 ]; then echo "== $name skipped: ${left}s of the ${BUDGET}s budget left" | tee -a "$OUT/steps.log"
                                      return 0; fi
         [ "$t" -gt "$left" ] && t=$left
         echo "== $name (timeout ${t}s)"
         timeout -k 10 "$t" "$@" >"$log" 2>&1; local rc=$?
         { echo "== $name rc=$rc $((SECONDS - t0))s"; grep -v "it/s\|s/it" "$log" | tail -n 40; } >>"$OUT/steps.log";
         echo "rc=$rc $name $((SECONDS - t0))s"; grep -v "it/s\|s/it" "$log" | tail -n 4; }
R=/tmp/runs
# Issue 18 first: the training step's host reads on CUDA (one per optimizer step), then the benchmark: both sizes
# in one process, with eager, default and reduce-overhead variants of patchgpt and HF each; past --time-limit it
# compiles nothing more and measures what it has; the JSON is written as soon as a size is measured.
step train_sync_test 45 $PY -m pytest -q tests/test_train_sync.py -p no:cacheprovider
step train_gpu 450 $PY benchmarks/bench_train_gpu.py --sizes small,base --compile-mode default,reduce-overhead \
     --iters 10 --repeats 3 --time-limit 330 --json "$OUT/train_gpu.json" --profile "$OUT/profile"
cp /tmp/gpu_check_train_gpu.log "$OUT/train_gpu.log" 2>/dev/null
grep -E "^(small|base) |warm-up|FAILED|skipped|profile:|matmul" /tmp/gpu_check_train_gpu.log 2>/dev/null | tail -n 40
step tests 60 $PY -m pytest -q -x tests/test_sampling.py tests/test_model.py -p no:cacheprovider
step sampling 100 $PY benchmarks/bench_sampling.py --device cuda --json "$OUT/sampling_gpu.json"
grep -E "x$|tokens/s" /tmp/gpu_check_sampling.log 2>/dev/null | tail -9
step imagegpt 120 $PY benchmarks/bench_imagegpt.py --device cuda --json "$OUT/imagegpt_gpu.json"
grep -E "images/s|tokens/s" /tmp/gpu_check_imagegpt.log 2>/dev/null
step train_bf16 60 $PY -m patchgpt train pretrain --data digits --out $R/pre --steps 300 --set train.accum=2
step torchrun_nccl 60 torchrun --standalone --nproc_per_node=1 -m patchgpt train classify --data digits --init $R/pre --out $R/cls --steps 200
step generate 60 $PY -m patchgpt train generate --data digits --set generate.condition=class --out $R/gen --steps 300
step sample 40 $PY -m patchgpt sample $R/gen --class 7 --n 16 --seed 0 --out "$OUT/sample_grid.png"
step detect 90 $PY -m patchgpt train detect --data digit-scenes --out $R/det --steps 300
step compile 200 $PY -m patchgpt train pretrain --data digits --out $R/prec --steps 200 --set train.compile=true
echo "== done in ${SECONDS}s"

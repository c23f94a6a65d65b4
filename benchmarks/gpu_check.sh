#!/usr/bin/env bash
# One short device check (one GPU): the CUDA-only tests, the sampling and iGPT benchmarks on CUDA, then the
# library's own CUDA paths end to end (bf16 training, torchrun/NCCL, generation + sampling, detection,
# torch.compile). Run from the repository root: bash benchmarks/gpu_check.sh OUTDIR (logs and JSON go there).
set -u -o pipefail
OUT=${1:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=python3
[ -d wheels ] && $PY -m pip install -q --no-index --no-deps wheels/*.whl  # pycocotools (detection mAP), carried
nvidia-smi -L | tee "$OUT/env.txt"
$PY -c "import torch, transformers; print(torch.__version__, transformers.__version__)" | tee -a "$OUT/env.txt"
# Each step's output goes to its own log under /tmp and is appended to $OUT/steps.log (few files come back).
step() { local name=$1 t=$2; shift 2; local t0=$SECONDS log=/tmp/gpu_check_$1.log; echo "== $name";
         timeout "$t" "$@" >"$log" 2>&1; local rc=$?
         { echo "== $name rc=$rc $((SECONDS - t0))s"; grep -v "it/s\|s/it" "$log" | tail -n 40; } >>"$OUT/steps.log";
         echo "rc=$rc $name $((SECONDS - t0))s"; grep -v "it/s\|s/it" "$log" | tail -n 4; }
R=/tmp/runs
step tests 60 $PY -m pytest -q -x tests/test_sampling.py tests/test_model.py -p no:cacheprovider
step sampling 100 $PY benchmarks/bench_sampling.py --device cuda --json "$OUT/sampling_gpu.json"
grep -E "x$|tokens/s" /tmp/gpu_check_sampling.log | tail -9
step imagegpt 120 $PY benchmarks/bench_imagegpt.py --device cuda --json "$OUT/imagegpt_gpu.json"
grep -E "images/s|tokens/s" /tmp/gpu_check_imagegpt.log
step train_bf16 60 $PY -m patchgpt train pretrain --data digits --out $R/pre --steps 300
step torchrun_nccl 60 torchrun --standalone --nproc_per_node=1 -m patchgpt train classify --data digits --init $R/pre --out $R/cls --steps 200
step generate 60 $PY -m patchgpt train generate --data digits --set generate.condition=class --out $R/gen --steps 300
step sample 40 $PY -m patchgpt sample $R/gen --class 7 --n 16 --seed 0 --out "$OUT/sample_grid.png"
step detect 90 $PY -m patchgpt train detect --data digit-scenes --out $R/det --steps 300
step compile 200 $PY -m patchgpt train pretrain --data digits --out $R/prec --steps 200 --set train.compile=true
echo "== done"

#!/bin/bash
# The GPU check of coca's CUDA path (README.md here says how to prepare and carry it).
# Run from the repository root on the device machine:  bash scripts/gpu/check.sh
# Writes logs and summary.txt to $OUT. Stages, each with a timeout:
#   1. bench step tiny b32 cold, then warm (same kernel cache): time to first step, kernels compiled
#   2. bench step base b64 cold, then warm: the same, plus ms/step, samples/s, FLOP/s
#   3. launch tiny (1 worker, eval, checkpoint) cold, then a fresh run of it, warm from the kernel cache;
#      then `coca kernels warm` fills a new job's empty cache and that job's worker starts warm
#   4. bench step base b64 in bf16; launch tiny on NCCL (world 1), tiny with 2 workers on the one
#      GPU (tcp); bench allreduce on NCCL (world 1)
#   5. launch base b64 (1 worker)
#   6. open_clip base b64, bf16 and TF32, on the same card (needs scripts/gpu/.whl)
# Usage: bash scripts/gpu/check.sh [all|startup|speed]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
G=$PWD/scripts/gpu; BIN=/tmp/coca-cuda
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('$G/coca-cuda.xz'), open('$BIN','wb'))" && chmod +x "$BIN"
S=$OUT/summary.txt
say() { echo "$*" | tee -a "$S"; }
say "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
LIBS=$(find "$SP/nvidia" -maxdepth 4 -type d -name lib 2>/dev/null | tr '\n' ':')
for c in /usr/local/cuda /usr/local/cuda-13.0; do [[ -d $c ]] && export CUDA_PATH=$c CUDA_HOME=$c && break; done
export LD_LIBRARY_PATH="${CUDA_PATH:+$CUDA_PATH/lib64:}${LIBS}/usr/local/nvidia/lib64:/usr/local/nvidia/lib:${LD_LIBRARY_PATH:-}"
# startup: stages 1-3; speed: stages 4-6, reusing startup's caches if the machine is still warm; all: both.
PART=${1:-all}
W=/tmp/coca-gpu; [ "$PART" = speed ] || rm -rf $W; mkdir -p $W; cd $W
reap() { for p in /proc/[0-9]*; do [[ $(readlink $p/exe 2>/dev/null) == "$BIN" ]] && kill -9 ${p#/proc/} 2>/dev/null; done; }
bench() { # name timeout preset batch [more bench step flags]
  local name=$1 t=$2 preset=$3 batch=$4; shift 4
  timeout "$t" "$BIN" bench step --backend cuda --preset "$preset" --batch "$batch" --steps 10 --warmup 3 \
    --kernel-cache "$W/bench-kernels" "$@" > "$OUT/$name.log" 2>&1; local rc=$?; reap
  say "== $name: rc=$rc"; grep -E "kernel cache|first step|median step|samples/s|FLOP/s|kernels|error" "$OUT/$name.log" | tee -a "$S"
}
stage() { # name timeout manifest [args]
  local name=$1 t=$2 m=$3; shift 3
  local t0=$(date +%s.%N)
  timeout "$t" "$BIN" launch "$G/$m" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  local t1=$(date +%s.%N); reap
  say "== $name: rc=$rc wall=$(python3 -c "print(round($t1-$t0,1))")s"
  grep -E "kernel cache|first step|kernels|error" "$OUT/$name.log" | head -8 | tee -a "$S"
  tail -2 "$OUT/$name.log" | tee -a "$S"
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader >> "$S"
}
if [ "$PART" != speed ]; then
bench bench-tiny-cold 60 tiny 32
bench bench-tiny-warm 30 tiny 32
bench bench-base-cold 150 base 64
bench bench-base-warm 60 base 64
stage launch-tiny-cold 90 tiny.toml
rm -rf runs/tiny   # a fresh job; its kernel cache stays
stage launch-tiny-warm 60 tiny.toml
# A fresh job with an empty cache of its own, filled by `coca kernels warm` before it starts.
sed -e 's#runs/tiny#runs/tiny-prewarmed#g' -e 's/"gpu-tiny"/"gpu-tiny-prewarmed"/' \
  -e 's/"kernel-cache"/"kernel-cache-prewarmed"/' "$G/tiny.toml" > "$G/tiny-prewarmed.toml"
timeout 90 "$BIN" kernels warm "$G/tiny-prewarmed.toml" > "$OUT/kernels-warm.log" 2>&1
say "== kernels warm tiny: rc=$?"; tail -2 "$OUT/kernels-warm.log" | tee -a "$S"; reap
stage launch-tiny-prewarmed 60 tiny-prewarmed.toml
# The driver's cache of the machine code it made from cubecl's PTX (CUDA_CACHE_PATH), kept with the rest.
say "== CUDA driver cache in the kernel cache: $(du -sh $W/bench-kernels/*/driver 2>&1)"
fi
[ "$PART" = startup ] && { say "== end $(date -u +%FT%TZ)"; exit 0; }
bench bench-base-bf16 120 base 64 --precision bf16
# NCCL: world 1 on the one GPU (the id exchange, the communicator, a whole job), then its all-reduce.
sed -e 's/^backend = "cuda"$/backend = "cuda"\ncollective = "nccl"/' -e 's#runs/tiny#runs/tiny-nccl#g' \
  -e 's/"gpu-tiny"/"gpu-tiny-nccl"/' "$G/tiny.toml" > "$G/tiny-nccl.toml"
stage launch-tiny-nccl 60 tiny-nccl.toml
rm -rf runs/tiny   # two workers on the one GPU over tcp: the cluster logic on one card
stage launch-tiny-2workers 90 tiny.toml --workers 2
# Staged through host memory, then the gradients' path on GPU memory (results checked to land where burn reads).
timeout 60 "$BIN" bench allreduce --collective nccl --world 1 --mib 256 > "$OUT/allreduce-nccl.log" 2>&1
say "== bench allreduce nccl world 1: rc=$?"; grep -E "median time|algorithm bw|on the device|results land|rror" "$OUT/allreduce-nccl.log" | tee -a "$S"; reap
stage launch-base 120 base.toml
if ls $G/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $G/.whl/*.whl && export PYTHONPATH=/tmp/site
  for dt in bf16 tf32; do
    PYTHONUNBUFFERED=1 timeout 80 python3 $G/openclip_gpu_step.py --preset base --decoder rust --batch 64 --steps 15 --warmup 5 --dtype $dt --device cuda > "$OUT/openclip-$dt.log" 2>&1
    say "== open_clip base b64 $dt: rc=$?"; tail -2 "$OUT/openclip-$dt.log" | tee -a "$S"
  done
fi
say "== end $(date -u +%FT%TZ)"

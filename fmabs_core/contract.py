"""The conventions every part of FM-ABS shares, written once: standard library only.

The library, the ``fmabs`` command, the Slicer module and the browser front-end all read and write
the same project and run folders. Everything they must agree on lives here, so that the Slicer
module can import it at load time, before numpy, torch or nibabel are installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

# ---- labels and views ------------------------------------------------------------------------------
#: cross-label value of voxels nobody labelled (0 = background, 1..254 = classes)
UNLABELLED = 255
MAX_CLASS = 254
#: the three views, and the canonical RAS array axis that is constant on a slice of each
VIEWS = ("axial", "coronal", "sagittal")
VIEW_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}

# ---- the project folder ----------------------------------------------------------------------------
PROJECT_FILE = "fmabs.json"
IMAGES_DIR, LABELS_DIR, CROSSLABELS_DIR, RUNS_DIR = "images", "labels", "crosslabels", "runs"

# ---- a run folder ----------------------------------------------------------------------------------
CONFIG_FILE = "config.json"
EVENTS_FILE = "events.jsonl"
STATUS_FILE = "status.json"
MODEL_FILE = "model.pt"
CHECKPOINTS_DIR = "checkpoints"
PSEUDO_DIR = "pseudo"
#: inside PSEUDO_DIR: the labels training reads, as memory-mapped .npy (``--scan-store disk``)
HELD_DIR = "held"
#: pseudo-label layers a run writes as ``pseudo/<case>_<layer>.nii.gz`` (FM-ABS: the three views and
#: their fusion; CFR: the fine-tuned generalist's prompt-free label)
GENERALIST_LAYER = "generalist"
PSEUDO_LAYERS = ("axial", "coronal", "sagittal", "fused", GENERALIST_LAYER)
#: ``pseudo/<case>_teacher.nii.gz``: the teacher's probabilities a round fused with (X, Y, Z, C+1 uint8, 255 = 1),
#: the input that ``fmabs pseudo-label --teacher-probs`` replays a round from (not a label layer)
TEACHER_FILE_KEY = "teacher"
ADAPTER_FILE = "generalist_adapter.pt"  # CFR: the fine-tuned generalist's LoRA adapter in the run folder
LOG_FILE = "train.log"
JOB_FILE = "job.json"
LOCK_FILE = ".lock"

#: states written to status.json by the training process
STARTING, RUNNING, DONE, FAILED, CANCELLED, WAITING = (
    "starting", "running", "done", "failed", "cancelled", "waiting_for_labels")
STATES = (STARTING, RUNNING, DONE, FAILED, CANCELLED, WAITING)
#: inferred by readers, never written: status.json says starting/running but no process holds the run
CRASHED = "crashed"
#: states after which no process works on the run (WAITING: the expert must cross-label scans first)
FINAL_STATES = (DONE, FAILED, CANCELLED, WAITING, CRASHED)

#: stages of a pipeline run (status.json ``stage``), with what the front-ends say while each runs
STAGE_TITLES = {"finetune": "fine-tuning the generalist", "pseudo": "pseudo-labelling the scans",
                "retrain": "re-training"}

#: what one ``fmabs train`` call ends with (the engine's outcome; :data:`EXIT_CODES` maps it)
OUTCOMES = (DONE, CANCELLED, WAITING, FAILED)

#: event types of events.jsonl, and the fields each always carries besides ``type, time, iteration``
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    "started": ("iterations", "device", "resumed", "pid", "host", "world_size", "method"),
    "stage": ("stage", "stages"),
    "stage_done": ("stage", "output", "seconds"),
    "progress": ("iterations", "loss", "losses", "lr", "eta_s", "step_s"),
    "validation": ("dice", "per_case", "best_dice"),
    "pseudo_label": ("round",),
    "suggestion": (),
    "checkpoint": ("path", "seconds"),
    "waiting_for_labels": ("cases",),
    "cancelled": ("checkpoint",),
    "done": ("model", "best_val_dice", "seconds"),
    "failed": ("error", "traceback"),
}
EVENT_TYPES = tuple(EVENT_FIELDS)

COMMON_EVENT_FIELDS = ("type", "time", "iteration")


#: the labels a training set can have: the expert's three drawn planes per scan, or whole labelled scans
LABEL_KINDS = ("cross", "dense")

def planes_line(event: dict) -> str | None:
    """What a ``pseudo_label`` event says to the user about their drawn slices (None when it has no planes).

    The round scores the teacher and the fused pseudo-labels against the expert's drawn planes of the
    cross-labelled scans; the gain is the evidence, on the user's own data, of what the generalist adds.
    One definition for ``fmabs jobs status``, the Slicer and the browser Train panels.
    """
    gain, t, f = event.get("planes_gain"), event.get("planes_teacher_dice"), event.get("planes_pseudo_dice")
    if not isinstance(gain, (int, float)) or not isinstance(t, (int, float)) or not isinstance(f, (int, float)):
        return None
    line = (f"round {event.get('round', '?')}: pseudo-labels vs teacher on your drawn slices: {100 * gain:+.1f} Dice "
            f"({100 * f:.1f} vs {100 * t:.1f}, {event.get('planes_scans', '?')} scans)")
    if isinstance(event.get("fusion"), str) and isinstance(event.get("fusion_scores"), dict):
        held = event.get("planes_gain_heldout")
        line += f"; fusion chosen on them: {event['fusion']}"
        if isinstance(held, (int, float)):
            line += f" (held-out estimate {100 * held:+.1f})"
        own = event.get("fusion_per_scan")
        if isinstance(own, dict) and own:
            line += f", {len(own)} scan(s) by their own slices ({', '.join(f'{k}: {v}' for k, v in own.items())})"
    if event.get("teacher_cut") is True and isinstance(event.get("teacher_voxels_removed"), int):
        line += f"; teacher cut to its largest part ({event['teacher_voxels_removed']} voxels removed)"
    elif event.get("teacher_cut") is False:
        line += "; teacher kept whole (cut, it scored lower on your slices)"
    if event.get("warning"):
        line += f"; WARNING: {event['warning']}"
    return line


# ---- exit codes of the ``fmabs`` command -----------------------------------------------------------
EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected error (the traceback is in the log and in events.jsonl)
EXIT_USAGE = 2  # bad input or options: the message says what to change
EXIT_NEEDS_LABELS = 3  # a run stopped for the human expert: cross-label the listed scans, run again
EXIT_CANCELLED = 130  # cancelled (SIGTERM / Ctrl+C); the same command resumes
EXIT_CODES = {DONE: EXIT_OK, FAILED: EXIT_FAILED, WAITING: EXIT_NEEDS_LABELS, CANCELLED: EXIT_CANCELLED}

# ---- names offered by the front-ends ---------------------------------------------------------------
#: generalists by their command-line name (fmabs_core.generalist holds the models)
GENERALISTS = ("litemedsam", "mobilesam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam")
#: next-scan strategies of active cross-labelling (fmabs_core.active.strategies holds the scores)
STRATEGIES = ("her", "he", "lc", "random")
EXPERTS = ("simulated", "human")
FUSIONS = ("auto", "mv", "ua", "soft", "gate", "staple")
DEVICE_HINT = "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str, what: str = "run name") -> str:
    """``name`` if it is safe as one folder or file name (letters, digits, ``._-``), else ValueError.

    Names come from users and files and become paths: no separators, no ``..``, no hidden files.
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is not usable as a folder name: use 1-128 letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    return name


def is_safe_name(name: str) -> bool:
    """Whether :func:`check_name` accepts ``name`` (a name to list or keep as it is, not an error to report)."""
    try:
        check_name(name)
    except ValueError:
        return False
    return True


def safe_case_id(name: str, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """A safe case id for a clinician's own file name (``my scan 1`` -> ``my_scan_1``, ``Müller`` -> ``Muller``),
    not in ``taken``; the original name is kept by the project (``fmabs.json`` ``names``).

    Accents are dropped (NFKD), every other character outside letters, digits and ``._-`` becomes ``_``; a name
    with nothing left (non-Latin letters only) becomes ``scan-<hash>``; a clash gets ``-2``, ``-3``, ...
    """
    import hashlib
    import unicodedata

    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", ascii_name).replace("..", "_")
    slug = re.sub(r"^[^A-Za-z0-9]+", "", slug).rstrip("._-")
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    if not slug:
        slug = f"scan-{digest}"
    if len(slug) > 120:
        slug = f"{slug[:111]}-{digest}"
    candidate, n = slug, 2
    while candidate in taken:
        candidate, n = f"{slug}-{n}", n + 1
    return check_name(candidate, "case id")


def parse_classes(text: str | None) -> dict[int, str]:
    """``'1:left atrium, 2:scar'`` -> ``{1: 'left atrium', 2: 'scar'}``; a bare list is numbered from 1.

    Empty text means one foreground class. Raises ValueError naming the part that does not parse.
    """
    text = (text or "").strip()
    if not text:
        return {1: "foreground"}
    out: dict[int, str] = {}
    for i, part in enumerate([p.strip() for p in re.split(r"[,;\n]", text) if p.strip()], start=1):
        if ":" in part:
            key, name = (s.strip() for s in part.split(":", 1))
            try:
                value = int(key)
            except ValueError:
                raise ValueError(f"class '{part}': the value before ':' must be an integer") from None
        else:
            value, name = i, part
        if not 1 <= value <= MAX_CLASS:
            raise ValueError(f"class '{part}': values must be 1..{MAX_CLASS} (0 is background, "
                             f"{UNLABELLED} 'not labelled')")
        if value in out:
            raise ValueError(f"class value {value} is given twice")
        out[value] = name or f"class{value}"
    return out


def fmabs_argv(args: Sequence[str], python: str) -> list[str]:
    """The command line that runs ``fmabs ARGS`` with the interpreter ``python`` (jobs, Slicer, web)."""
    return [python, "-m", "fmabs_core", *[str(a) for a in args]]


def train_args(project: str, run: str, method: str, options: Mapping[str, object] | None = None) -> list[str]:
    """Arguments of ``fmabs train`` for a project, run and method; ``options`` are ``--key value`` pairs.

    Keys are option names without dashes (``iterations``, ``device``, ``generalist``...); None and
    False leave the command's default, True gives a bare flag, a list or tuple gives several values.
    """
    check_name(run)
    args = ["train", "--project", str(project), "--run", run, "--method", method]
    for key, value in (options or {}).items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


#: the training methods as ``fmabs methods --json`` lists them, kept beside this file so that the Slicer
#: module reads them without importing torch (Testing/core/methods/test_method_catalog.py keeps it equal to
#: the registry; after adding a method: fmabs methods --json fmabs_core/method_catalog.json --overwrite)
METHOD_CATALOG_FILE = Path(__file__).with_name("method_catalog.json")


def method_catalog() -> list[dict[str, Any]]:
    """The methods (name, description, supervision, iterations, options) without importing them; [] if unreadable."""
    try:
        data = json.loads(METHOD_CATALOG_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [dict(m) for m in data if isinstance(m, dict) and m.get("name")] if isinstance(data, list) else []

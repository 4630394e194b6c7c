"""Background jobs: launch ``fmabs`` in its own process and watch its run folder.

The GUI never imports torch and never waits: it starts ``python -m fmabs_core ...`` with
``subprocess.Popen`` and a timer calls :meth:`RunWatcher.poll`, which only reads
``status.json`` and the new complete lines of ``events.jsonl``. A job writes those files while
we read, so every read tolerates a missing file, a half-written JSON and a partial last line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

#: choices offered by the Train panel (values are the CLI's; stdlib-only so the GUI can fill its combo boxes
#: before the dependencies are installed)
METHODS = ("fmabs", "mt", "sup", "sup-dense")
GENERALISTS = ("litemedsam", "mobilesam", "sam_vit_b", "medsam")
STRATEGIES = ("none", "her", "he", "lc", "random")
DEVICES = ("auto", "cpu", "cuda")
EXPERTS = ("human", "simulated")

#: states after which the job process is gone; "waiting_for_labels": an active-learning run with a human
#: expert stopped after suggesting scans (label them, then start the same run again to resume)
WAITING = "waiting_for_labels"
EXIT_NEEDS_LABELS = 3  # exit code of `fmabs train` when it waits for the expert
FINAL_STATES = ("done", "failed", "cancelled", "stale", WAITING)
EVENT_TYPES = ("started", "progress", "validation", "pseudo_label", "suggestion", "checkpoint", "cancelled",
               "done", "failed")


# ---- status -------------------------------------------------------------------------------------
@dataclass
class JobStatus:
    """What the Train panel shows. ``state`` is one of not started/running/done/failed/cancelled/stale."""

    state: str = "not started"
    iteration: int | None = None
    total: int | None = None
    eta_s: float | None = None
    val_dice: float | None = None
    pid: int | None = None
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    waiting_for: list[str] = field(default_factory=list)  # scans the expert must cross-label to resume

    @property
    def fraction(self) -> float:
        if not self.iteration or not self.total:
            return 1.0 if self.state == "done" else 0.0
        return max(0.0, min(1.0, self.iteration / self.total))

    @property
    def eta_text(self) -> str:
        return format_eta(self.eta_s) if self.state == "running" else ""

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


def format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def _first(d: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in d and d[key] is not None:
            return d[key]
    return None


def _as_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _as_float(value: Any) -> float | None:
    try:
        out = None if value is None else float(value)
    except (TypeError, ValueError):
        return None
    return out if out is None or math.isfinite(out) else None


def dice_from(metrics: Mapping[str, Any]) -> float | None:
    """Validation Dice from a metrics dict, whatever the key spelling (val_dice, dice, val/dice...)."""
    for key in ("val_dice", "dice", "val/dice", "mean_dice", "val_mean_dice"):
        if key in metrics:
            return _as_float(metrics[key])
    for key in ("val", "validation"):
        if isinstance(metrics.get(key), Mapping):
            return dice_from(metrics[key])
    return None


def status_from_dict(data: Mapping[str, Any]) -> JobStatus:
    """Interpret status.json (tolerating the spellings a job might use)."""
    metrics = _first(data, "metrics", "last_metrics") or {}
    if not isinstance(metrics, Mapping):
        metrics = {}
    state = str(_first(data, "state", "status") or "running").lower()
    if state in ("finished", "completed", "complete"):
        state = "done"
    if state in ("error", "crashed"):
        state = "failed"
    if state in ("canceled", "terminated", "interrupted", "stopped"):
        state = "cancelled"
    if state in ("starting", "queued", "training", "validating", "pseudo_label"):
        state = "running"
    if state in ("waiting", "needs_labels", WAITING):
        state = WAITING
    waiting = data.get("waiting_for_labels")
    return JobStatus(
        state=state,
        iteration=_as_int(_first(data, "iteration", "iter", "step")),
        total=_as_int(_first(data, "total_iterations", "iterations", "total", "max_iterations")),
        eta_s=_as_float(_first(data, "eta_s", "eta")),
        val_dice=dice_from(metrics) if metrics else _as_float(_first(data, "val_dice", "dice")),
        pid=_as_int(data.get("pid")),
        error=_first(data, "error", "message") if state == "failed" else None,
        metrics=dict(metrics),
        waiting_for=[str(c) for c in waiting] if isinstance(waiting, list) and state == WAITING else [],
    )


def read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """A JSON object from a file being rewritten by another process: None if missing or half-written."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        log.debug("%s: not complete JSON yet", path)
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int | None) -> bool:
    """True when a process with this id exists (a zombie of ours counts as alive until reaped)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


# ---- events -------------------------------------------------------------------------------------
class EventReader:
    """Reads events.jsonl incrementally: only complete lines, remembering the byte offset."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # the file was replaced (a new run with the same name): start over
            self.offset = 0
        if size == self.offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return []  # a partial first line: wait for its newline
        self.offset += end + 1
        events = []
        for number, raw in enumerate(chunk[: end + 1].splitlines()):
            line = raw.strip()
            if not line:
                continue
            try:
                event = json.loads(line.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                log.warning("%s: skipping a line that is not JSON: %r", self.path, line[:120])
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


def format_event(event: Mapping[str, Any]) -> str:
    """One readable log line per event."""
    kind = str(event.get("type", "event"))
    it = event.get("iteration")
    prefix = f"[{it}] " if it is not None else ""
    if kind == "progress":
        parts = []
        for key in ("loss", "lr"):
            value = _as_float(event.get(key))
            if value is not None:
                parts.append(f"{key} {value:.4g}")
        losses = event.get("losses")
        if isinstance(losses, Mapping):
            parts += [f"{k} {float(v):.4g}" for k, v in losses.items() if _as_float(v) is not None]
        eta = _as_float(event.get("eta_s"))
        if eta is not None:
            parts.append(f"ETA {format_eta(eta)}")
        return f"{prefix}progress: " + ", ".join(parts)
    if kind == "validation":
        dice = dice_from(event.get("metrics", event) if isinstance(event.get("metrics", event), Mapping) else event)
        return f"{prefix}validation Dice {dice:.4f}" if dice is not None else f"{prefix}validation"
    if kind == "pseudo_label":
        cases = event.get("cases")
        n = len(cases) if isinstance(cases, list) else event.get("n_cases", "?")
        return f"{prefix}SAM pseudo-labels refreshed for {n} scans"
    if kind == "suggestion":
        names = [s.case for s in parse_suggestions(event)]
        return f"{prefix}next scans to label: {', '.join(names) if names else '(none)'}"
    if kind == "started":
        total = event.get("iterations")
        return f"{prefix}started" + (f" ({total} iterations on {event.get('device', '?')})" if total else "")
    if kind == "checkpoint":
        return f"{prefix}checkpoint saved"
    if kind == "cancelled":
        return f"{prefix}cancelled (resume by starting the same run again)"
    if kind == "done":
        return f"{prefix}done"
    if kind == "failed":
        return f"{prefix}FAILED: {event.get('error', event.get('message', 'unknown error'))}"
    return f"{prefix}{kind}: " + json.dumps({k: v for k, v in event.items() if k != "type"})[:200]


class RunWatcher:
    """Everything the Train panel needs from a run folder, re-read on each timer tick."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.events = EventReader(self.run_dir / "events.jsonl")
        self.status = JobStatus()
        self.last_suggestion: dict[str, Any] | None = None
        self.last_event_state: str | None = None

    def poll(self, process_running: bool | None = None) -> tuple[JobStatus, list[str]]:
        """(current status, new log lines). ``process_running`` is what the launcher knows, if anything."""
        lines = []
        for event in self.events.read_new():
            kind = event.get("type")
            lines.append(format_event(event))
            if kind == "validation":
                dice = dice_from(event.get("metrics", event) if isinstance(event.get("metrics", event), Mapping) else event)
                if dice is not None:
                    self.status.val_dice = dice
            elif kind == "suggestion":
                self.last_suggestion = event
            elif kind in ("done", "cancelled"):
                self.last_event_state = kind
            elif kind == "started":  # a resumed run: earlier done/cancelled/failed no longer apply
                self.last_event_state = None
                self.status.error = None
            elif kind == "failed":
                self.last_event_state = "failed"
                self.status.error = str(event.get("error", event.get("message", "unknown error")))
            if kind in ("progress", "started"):
                for attr, key in (("iteration", "iteration"), ("total", "total_iterations"), ("total", "iterations")):
                    value = _as_int(event.get(key))
                    if value is not None:
                        setattr(self.status, attr, value)
                eta = _as_float(event.get("eta_s"))
                if eta is not None:
                    self.status.eta_s = eta
                if self.status.state == "not started":
                    self.status.state = "running"
        data = read_json(self.run_dir / "status.json")
        if data is not None:
            fresh = status_from_dict(data)
            if fresh.val_dice is None:
                fresh.val_dice = self.status.val_dice
            if fresh.error is None:
                fresh.error = self.status.error
            self.status = fresh
        if self.last_event_state and self.status.state not in ("done", "failed", "cancelled", WAITING):
            self.status.state = self.last_event_state
        if self.status.state == "running":
            alive = process_running if process_running is not None else pid_alive(self.status.pid)
            if not alive and (process_running is not None or self.status.pid):
                # the process is gone without writing done/failed: killed, out of memory, or a crash
                self.status.state = "stale"
                self.status.error = self.status.error or "the training process ended without a final status; see the log"
        return self.status, lines


# ---- suggestions --------------------------------------------------------------------------------
@dataclass
class Suggestion:
    case: str
    score: float | None
    slices: dict[str, dict[str, Any]]  # view -> {"index": int|None, "ras": [x, y, z]|None}


def parse_suggestions(data: Any) -> list[Suggestion]:
    """Suggestions from ``fmabs suggest`` output or a suggestion event (a list or {"cases": [...]})."""
    if isinstance(data, (str, bytes)):
        data = json.loads(data)
    if isinstance(data, Mapping):
        for key in ("cases", "suggestions", "suggested"):
            if key in data:
                data = data[key]
                break
        else:
            data = [data] if ("case" in data or "axial" in data) else []
    out = []
    for item in data or []:
        if isinstance(item, str):
            out.append(Suggestion(item, None, {}))
            continue
        if not isinstance(item, Mapping):
            continue
        case = _first(item, "case", "name", "id")
        if case is None:
            continue
        source = item.get("slices") if isinstance(item.get("slices"), Mapping) else item
        slices = {}
        for view in ("axial", "coronal", "sagittal"):
            entry = source.get(view)
            if isinstance(entry, Mapping):
                slices[view] = {"index": _as_int(entry.get("index")), "ras": entry.get("ras")}
            elif _as_int(entry) is not None:
                slices[view] = {"index": _as_int(entry), "ras": None}
        out.append(Suggestion(str(case), _as_float(item.get("score")), slices))
    return out


# ---- processes ----------------------------------------------------------------------------------
def python_executable() -> str:
    """The Python that runs jobs: Slicer's PythonSlicer launcher when present, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def fmabs_argv(args: Sequence[str], python: str | None = None) -> list[str]:
    return [python or python_executable(), "-m", "fmabs_core", *[str(a) for a in args]]


def train_args(project: str | os.PathLike, run: str, method: str, iterations: int, device: str = "cpu",
               generalist: str | None = None, active: str | None = None, budget: int | None = None) -> list[str]:
    """Arguments of ``fmabs train`` from the Train panel's choices (None leaves the CLI default)."""
    if not run or any(c in run for c in "/\\") or run in (".", ".."):
        raise ValueError(f"run name '{run}' is not a valid folder name")
    if int(iterations) <= 0:
        raise ValueError(f"iterations must be positive, got {iterations}")
    args = ["train", "--project", str(project), "--method", method, "--iterations", str(int(iterations)),
            "--run", run, "--device", device]
    if generalist:
        args += ["--generalist", generalist]
    if active and active != "none":
        args += ["--active", active]
        if budget:
            args += ["--budget", str(int(budget))]
    return args


def job_environment(extra_paths: Iterable[str | os.PathLike] = ()) -> dict[str, str]:
    """Environment for a job: unbuffered output, and fmabs_core's folder on PYTHONPATH when not installed."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    paths = [str(p) for p in extra_paths if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


class BackgroundProcess:
    """A child process whose output goes to a log file; poll() never blocks; cancel() sends SIGTERM."""

    def __init__(self, argv: Sequence[str], log_path: str | os.PathLike, env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike | None = None):
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting: %s (log: %s)", " ".join(self.argv), self.log_path)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None, cwd=str(cwd) if cwd else None,
                start_new_session=(os.name == "posix"),  # Slicer's own signals (Ctrl+C) do not reach the job
            )
        self.cancelled = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        """Return code once finished (reaps the child), else None."""
        return self.process.poll()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def running(self) -> bool:
        return self.poll() is None

    def cancel(self) -> None:
        """SIGTERM: the job checkpoints and exits (Windows: terminate)."""
        if self.poll() is not None:
            return
        self.cancelled = True
        log.info("cancelling pid %d", self.pid)
        if os.name == "posix":
            self.process.send_signal(signal.SIGTERM)
        else:
            self.process.terminate()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max_chars))
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

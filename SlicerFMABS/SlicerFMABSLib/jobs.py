"""Background jobs: launch ``fmabs`` in its own process and watch its run folder.

The GUI never imports torch and never waits: it starts ``python -m fmabs_core ...`` (one command
line, :func:`fmabs_argv`) and a timer calls :meth:`RunWatcher.poll`, which only reads
``status.json`` and the new complete lines of ``events.jsonl``. A job writes those files while
we read, so every read tolerates a missing file, a half-written JSON and a partial last line.

A training run must outlive Slicer, so it is always launched detached (:func:`launch_detached`): in a
session of its own, writing its output straight into the run's log file, with no pipe that Slicer
owns (once Slicer exits, a write into such a pipe would fail and stop the run). Short jobs (suggest,
segment) are launched inside the application the way Slicer launches its own Python processes, with
``slicer.util.launchConsoleProcess`` (Slicer's environment, no console window on Windows), a thread
copying their output into the log file; they write their answer into a file, never to stdout.
Elsewhere (tests, a plain Python) every job is a ``subprocess.Popen`` writing straight into its log file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import deps

log = logging.getLogger(__name__)

# The conventions shared with fmabs_core (state names, exit codes, event types, choices) come from
# fmabs_core.contract, which is standard-library only: it imports before numpy/torch are installed.
# fmabs_core itself must be on sys.path first (bundled beside the module, not pip-installed).
deps.ensure_fmabs_core_importable()

from fmabs_core import contract  # noqa: E402  (needs the path set up above)
from fmabs_core.contract import (  # noqa: E402,F401  (re-exported for the module and its tests)
    CANCELLED, CRASHED, DONE, EVENT_TYPES, EVENTS_FILE, EXIT_NEEDS_LABELS, FAILED, FINAL_STATES, RUNNING, STATUS_FILE,
    WAITING)

#: choices offered by the Train panel (values are the CLI's). The methods come from the job's Python
#: (:func:`available_methods`); these names are shown until it answers (dependencies not installed yet).
METHODS = ("fmabs", "mt", "sup", "sup-dense")
GENERALISTS = contract.GENERALISTS
STRATEGIES = ("none", *contract.STRATEGIES)  # "none": train without active cross-labelling
DEVICES = ("auto", "cpu", "cuda")
EXPERTS = ("human", *(e for e in contract.EXPERTS if e != "human"))  # in the GUI, the user labels by default
NOT_STARTED = "not started"


# ---- status -------------------------------------------------------------------------------------
@dataclass
class JobStatus:
    """What the Train panel shows. ``state``: not started, running, or one of FINAL_STATES (done, failed,
    cancelled, waiting_for_labels, crashed: the process ended without writing a final state)."""

    state: str = NOT_STARTED
    iteration: int | None = None
    total: int | None = None
    eta_s: float | None = None
    val_dice: float | None = None
    pid: int | None = None
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    waiting_for: list[str] = field(default_factory=list)  # scans the expert must cross-label to resume
    stage: str | None = None  # a pipeline's stage (CFR: finetune, pseudo, retrain)
    #: per pseudo-label round, oldest first: pseudo-labels vs teacher on the expert's drawn slices
    #: (:func:`fmabs_core.contract.planes_line`); a round written again after a resume replaces its line
    planes: list[str] = field(default_factory=list)
    planes_warning: str | None = None  # the latest scored round's warning (pseudo-labels worse than the teacher)

    @property
    def stage_title(self) -> str:
        """What the panel says the run is doing ("fine-tuning the generalist", ...), or ''."""
        return contract.STAGE_TITLES.get(self.stage, self.stage) if self.stage and self.state == RUNNING else ""

    @property
    def fraction(self) -> float:
        if not self.iteration or not self.total:
            return 1.0 if self.state == DONE else 0.0
        return max(0.0, min(1.0, self.iteration / self.total))

    @property
    def eta_text(self) -> str:
        return format_eta(self.eta_s) if self.state == RUNNING else ""

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


def status_line(status: JobStatus) -> str:
    """The Train panel's state line: "running (fine-tuning the generalist) 40/100"."""
    done = f"{status.iteration}/{status.total}" if status.total else ""
    state = f"{status.state} ({status.stage_title})" if status.stage_title else status.state
    return f"{state} {done}".strip()


def planes_text(status: JobStatus) -> str:
    """The Train panel's pseudo-label line: the latest round's score on the drawn slices, or ''."""
    return status.planes[-1] if status.planes else ""


#: how the Train panels show a round whose pseudo-labels are worse than the teacher on the drawn slices
WARNING_STYLE = "color: #e65100; font-weight: bold;"


def planes_style(status: JobStatus) -> str:
    """The pseudo-label line's style sheet: :data:`WARNING_STYLE` when the latest round has a warning."""
    return WARNING_STYLE if status.planes and status.planes_warning else ""


def format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


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


def status_from_dict(data: Mapping[str, Any]) -> JobStatus:
    """Interpret status.json as the training process writes it (docs/events.md; names from the contract).

    Tolerant of a file from another version: unknown states read as running, bad numbers as unknown.
    """
    metrics = data.get("metrics") if isinstance(data.get("metrics"), Mapping) else {}
    state = str(data.get("state") or RUNNING)
    if state == contract.STARTING or state not in (*FINAL_STATES, RUNNING):
        state = RUNNING
    waiting = data.get("waiting_for_labels")
    stage = data.get("stage") if isinstance(data.get("stage"), str) else None
    return JobStatus(
        state=state,
        iteration=_as_int(data.get("iteration")),
        total=_as_int(data.get("iterations")),
        eta_s=_as_float(data.get("eta_s")),
        val_dice=_as_float(metrics.get("val_dice", data.get("val_dice"))),
        pid=_as_int(data.get("pid")),
        error=data.get("error") if state in (FAILED, CRASHED) else None,
        metrics=dict(metrics),
        waiting_for=[str(c) for c in waiting] if isinstance(waiting, list) and state == WAITING else [],
        stage=stage,
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
    """True when a process with this id exists and has not exited.

    With psutil (installed with the dependencies) a zombie counts as gone. Without it: POSIX asks
    ``os.kill(pid, 0)`` (a zombie counts as alive); elsewhere the answer is a conservative True
    (on Windows ``os.kill`` would terminate the process, whatever the signal).
    """
    if not pid or pid <= 0:
        return False
    try:
        from fmabs_core.runs.process import pid_alive as alive  # psutil: only once the dependencies are installed
    except ImportError:
        alive = None
    if alive is not None:
        return alive(int(pid))
    if os.name != "posix":
        return True
    try:
        os.kill(int(pid), 0)
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
        dice = _as_float(event.get("dice"))
        return f"{prefix}validation Dice {dice:.4f}" if dice is not None else f"{prefix}validation"
    if kind == "pseudo_label":
        cases = event.get("cases")  # a count in current runs; a list of scans in older ones
        n = len(cases) if isinstance(cases, list) else _as_int(cases)
        n = event.get("n_cases", "?") if n is None else n
        planes = contract.planes_line(event)
        return f"{prefix}SAM pseudo-labels refreshed for {n} scans" + (f"; {planes}" if planes else "")
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
    if kind == "stage":
        stages = event.get("stages")
        of = f" of {len(stages)}" if isinstance(stages, list) else ""
        name = event.get("stage", "?")
        return f"{prefix}stage {name}{of}: {contract.STAGE_TITLES.get(name, name)}"
    if kind == WAITING:
        cases = event.get("cases")
        names = ", ".join(str(c) for c in cases) if isinstance(cases, list) else "the suggested scans"
        return f"{prefix}waiting for the expert's cross-labels: {names}"
    if kind == "done":
        return f"{prefix}done"
    if kind == "failed":
        return f"{prefix}FAILED: {event.get('error', event.get('message', 'unknown error'))}"
    return f"{prefix}{kind}: " + json.dumps({k: v for k, v in event.items() if k != "type"})[:200]


class RunWatcher:
    """Everything the Train panel needs from a run folder, re-read on each timer tick."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.events = EventReader(self.run_dir / EVENTS_FILE)
        self.status = JobStatus()
        self.last_suggestion: dict[str, Any] | None = None
        self.last_event_state: str | None = None
        self._planes: dict[Any, str] = {}  # round -> its planes line (a resumed round replaces its line)
        self._planes_warning: str | None = None
        #: why following the run stopped (reading its files raised); the panel shows it once and stops polling
        self.failed: str | None = None

    @property
    def active(self) -> bool:
        """Worth polling: not finished and not failed."""
        return self.failed is None and not self.status.finished

    def poll(self, process_running: bool | None = None) -> tuple[JobStatus, list[str]]:
        """(current status, new log lines). ``process_running`` is what the launcher knows, if anything."""
        lines = []
        for event in self.events.read_new():
            kind = event.get("type")
            lines.append(format_event(event))
            if kind == "validation":
                dice = _as_float(event.get("dice"))
                if dice is not None:
                    self.status.val_dice = dice
            elif kind == "suggestion":
                self.last_suggestion = event
            elif kind == "pseudo_label":
                planes = contract.planes_line(event)
                if planes is not None:
                    key = event.get("round")
                    self._planes[key if isinstance(key, (int, str)) else len(self._planes)] = planes
                    self._planes_warning = str(event["warning"]) if event.get("warning") else None
            elif kind in (DONE, CANCELLED):
                self.last_event_state = kind
            elif kind == WAITING:
                self.last_event_state = WAITING
                cases = event.get("cases")
                if isinstance(cases, list):
                    self.status.waiting_for = [str(c) for c in cases]
            elif kind == "started":  # a resumed run: earlier done/cancelled/failed no longer apply
                self.last_event_state = None
                self.status.error = None
            elif kind == FAILED:
                self.last_event_state = FAILED
                self.status.error = str(event.get("error", event.get("message", "unknown error")))
            if kind in ("progress", "started"):
                for attr, key in (("iteration", "iteration"), ("total", "total_iterations"), ("total", "iterations")):
                    value = _as_int(event.get(key))
                    if value is not None:
                        setattr(self.status, attr, value)
                eta = _as_float(event.get("eta_s"))
                if eta is not None:
                    self.status.eta_s = eta
                if self.status.state == NOT_STARTED:
                    self.status.state = RUNNING
        data = read_json(self.run_dir / STATUS_FILE)
        if data is not None:
            fresh = status_from_dict(data)
            if fresh.val_dice is None:
                fresh.val_dice = self.status.val_dice
            if fresh.error is None:
                fresh.error = self.status.error
            if not fresh.waiting_for:
                fresh.waiting_for = self.status.waiting_for
            self.status = fresh
        self.status.planes, self.status.planes_warning = list(self._planes.values()), self._planes_warning
        if self.last_event_state and self.status.state not in (DONE, FAILED, CANCELLED, WAITING):
            self.status.state = self.last_event_state
        if self.status.state == RUNNING:
            alive = process_running if process_running is not None else pid_alive(self.status.pid)
            if not alive and (process_running is not None or self.status.pid):
                # the process is gone without writing done/failed: killed, out of memory, or a crash
                self.status.state = CRASHED
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
        case = item.get("case")
        if case is None:
            continue
        source = item.get("slices") if isinstance(item.get("slices"), Mapping) else item
        slices = {}
        for view in contract.VIEWS:
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
    """:func:`fmabs_core.contract.fmabs_argv` with the jobs' interpreter (:func:`python_executable`) by default."""
    return contract.fmabs_argv(args, python or python_executable())


def available_methods(python: str | None = None) -> list[dict[str, Any]]:
    """The training methods (``fmabs methods --json``: name, description, supervision, iterations, options),
    read from fmabs_core's method catalog: no process, no torch import, so the panel never waits for it.
    ``python`` is accepted for older callers; the catalog is the bundled fmabs_core's."""
    methods = contract.method_catalog()
    if not methods:
        log.warning("fmabs_core's method catalog (%s) is missing or unreadable; the Train panel lists the "
                    "default method names", contract.METHOD_CATALOG_FILE)
    return methods


#: which method family fits which labels (the Train panel shows it under the method list)
METHOD_GUIDE = ("Three drawn slices on many scans: fmabs (or mt, ua-mt, cps, sup). "
                "One or a few densely labelled scans: cfr-mt (or cfr-acmt, cfr-st).")


def _method_entry(method: str, python: str | None = None) -> dict[str, Any] | None:
    """``method``'s entry in :func:`available_methods`, or None when it is not listed (or the list is unreadable)."""
    return next((m for m in available_methods(python) if m.get("name") == method), None)


def method_takes(method: str, option: str, python: str | None = None) -> bool:
    """Whether ``fmabs train --method METHOD`` has ``--OPTION`` (e.g. ``generalist``: fmabs and cfr-* do, sup
    and mt do not, and fmabs train refuses it for them). True when the list cannot be read: fmabs train decides."""
    entry = _method_entry(method, python)
    if entry is None:
        return True
    return any(isinstance(o, dict) and o.get("name") == option for o in entry.get("options", []))


def default_iterations(method: str, python: str | None = None) -> int | None:
    """The iterations ``fmabs train`` gives ``method`` by default (its paper's), or None when unknown here."""
    entry = _method_entry(method, python)
    iterations = None if entry is None else entry.get("iterations")
    return iterations if isinstance(iterations, int) else None


def method_names(python: str | None = None) -> tuple[str, ...]:
    """Names for the Train panel's method list: :func:`available_methods`, else :data:`METHODS`."""
    return tuple(str(m["name"]) for m in available_methods(python)) or METHODS


def _no_window() -> dict[str, Any]:
    """Popen options for a child without a console window (Windows; Slicer itself has no console)."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NO_WINDOW}  # type: ignore[attr-defined]
    return {}


def _detached() -> dict[str, Any]:
    """Popen options that keep Slicer's own signals (Ctrl+C in its terminal) from reaching a job:
    a new session on POSIX, a new process group without a console window on Windows."""
    if os.name == "nt":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW  # type: ignore[attr-defined]
        return {"creationflags": flags}
    return {"start_new_session": True}


def job_environment(extra_paths: Iterable[str | os.PathLike] = ()) -> dict[str, str]:
    """Environment for a job: unbuffered output, and fmabs_core's folder on PYTHONPATH when not installed."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    paths = [str(p) for p in extra_paths if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def in_slicer_application() -> bool:
    """True inside the Slicer application (not in a plain Python with the slicer-core MRML wheel)."""
    try:
        import slicer
    except ImportError:
        return False
    return getattr(slicer, "app", None) is not None and hasattr(getattr(slicer, "util", None), "launchConsoleProcess")


def environment_changes(env: Mapping[str, str] | None) -> dict[str, str] | None:
    """What ``env`` sets differently from this process's environment (``launchConsoleProcess`` takes the changes)."""
    if env is None:
        return None
    return {k: v for k, v in env.items() if os.environ.get(k) != v} or None


def _copy_output(stream: Any, log_path: Path) -> None:
    """Copy a child's output pipe into its log file until the pipe closes (runs in a thread)."""
    raw = getattr(stream, "buffer", stream)  # bytes: no decoding, so a non-UTF-8 line cannot stop the copy
    try:
        with open(log_path, "ab", buffering=0) as out:
            while True:
                chunk = raw.read1(65536) if hasattr(raw, "read1") else raw.read(65536)
                if not chunk:
                    break
                out.write(chunk if isinstance(chunk, bytes) else chunk.encode("utf-8", "replace"))
    except (OSError, ValueError):
        log.warning("stopped copying the output of a job into %s", log_path, exc_info=True)
    finally:
        try:
            stream.close()
        except OSError:
            pass


def launch_popen(argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None,
                 cwd: str | os.PathLike | None) -> tuple[subprocess.Popen, threading.Thread | None]:
    """Outside Slicer: the child writes into the log file itself, in a session of its own (no Ctrl+C from us)."""
    with open(log_path, "ab") as out:
        process = subprocess.Popen(
            list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None, cwd=str(cwd) if cwd else None, **_detached(),
        )
    return process, None


def launch_detached(argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None,
                    cwd: str | os.PathLike | None) -> tuple[subprocess.Popen, threading.Thread | None]:
    """A job that outlives Slicer (training): its own session (Windows: process group, no console window),
    its output written by itself into ``log_path``; Slicer's environment is passed as ``env``."""
    return launch_popen(argv, log_path, env, cwd)


def launch_slicer(argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None,
                  cwd: str | os.PathLike | None) -> tuple[subprocess.Popen, threading.Thread | None]:
    """Inside Slicer: ``slicer.util.launchConsoleProcess`` (no console window on Windows) with this process's
    environment plus the job's changes, as Slicer itself runs ``PythonSlicer -m pip``; a thread copies the
    output pipe into the log file."""
    import slicer

    process = slicer.util.launchConsoleProcess(list(argv), useStartupEnvironment=False,
                                               updateEnvironment=environment_changes(env),
                                               cwd=str(cwd) if cwd else None)
    pump = threading.Thread(target=_copy_output, args=(process.stdout, log_path), daemon=True,
                            name=f"fmabs-job-{process.pid}-output")
    pump.start()
    return process, pump


class BackgroundProcess:
    """A child process whose output goes to a log file; poll() never blocks; cancel() stops its whole tree.

    ``launcher``: :func:`launch_slicer` or :func:`launch_popen` (or a function like them); by default the
    first inside the Slicer application, the second elsewhere. Both run the same command line.
    """

    def __init__(self, argv: Sequence[str], log_path: str | os.PathLike, env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike | None = None, launcher: Any = None):
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        launcher = launcher or (launch_slicer if in_slicer_application() else launch_popen)
        self.launched_by = getattr(launcher, "__name__", str(launcher))
        log.info("starting: %s (log: %s; %s)", " ".join(self.argv), self.log_path, self.launched_by)
        self.process, self._pump = launcher(self.argv, self.log_path, env, cwd)
        self.cancelled = False

    def _finish_output(self, timeout: float = 5.0) -> None:
        """Once the process has ended: let the last of its output reach the log file (a few seconds at most:
        a grandchild that kept the pipe open must not block the GUI)."""
        if self._pump is not None and self._pump.is_alive():
            self._pump.join(timeout)

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        """Return code once finished (reaps the child), else None. Never waits (the GUI's timer calls it): the
        last of a launchConsoleProcess job's output may reach the log a moment later (:meth:`wait` waits for it)."""
        code = self.process.poll()
        if code is not None:
            self._finish_output(timeout=0)
        return code

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def running(self) -> bool:
        return self.poll() is None

    def cancel(self, timeout_s: float = 2.0, block: bool = False) -> None:
        """Stop the job and every process it started: SIGTERM (Windows: TerminateProcess), then a kill
        of whatever still runs after ``timeout_s``; in a background thread unless ``block`` (the GUI
        must not wait): :meth:`poll` says when it has ended.

        The whole tree, because the job may be Slicer's ``PythonSlicer``, a launcher that runs the real
        interpreter as its child and forwards no signal. For a training run, the polite cancel (SIGTERM
        to the process holding the run lock, which checkpoints first) is ``FMABSLogic.cancel_training``.
        """
        if self.poll() is not None:
            return
        self.cancelled = True
        log.info("cancelling pid %d and its child processes", self.pid)
        try:
            from fmabs_core.runs.process import kill_tree  # psutil: jobs exist only once dependencies are installed
        except ImportError:
            self.process.terminate()
            return
        if block:
            kill_tree(self.pid, timeout=timeout_s)
            return
        self._killer = threading.Thread(target=kill_tree, args=(self.pid,), kwargs={"timeout": timeout_s},
                                        daemon=True, name=f"fmabs-job-{self.pid}-cancel")
        self._killer.start()

    def wait(self, timeout: float | None = None) -> int:
        code = self.process.wait(timeout)
        self._finish_output()
        return code

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max_chars))
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

"""events.jsonl and status.json: the documented schema, failures, out-of-memory advice, torn lines."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from fmabs_core.training.config import TrainConfig
from fmabs_core.data.project import Project
from fmabs_core.training.engine import OutOfMemory, Trainer
from fmabs_core.errors import FmabsError
from fmabs_core.runs.events import COMMON_FIELDS, EVENT_TYPES, REQUIRED_FIELDS, RunLog, read_events, read_status
from fmabs_core.training.nets import NetConfig

STATUS_FIELDS = ("state", "run", "method", "iteration", "iterations", "eta_s", "lr", "losses", "metrics", "pid",
                 "device", "host", "updated", "started", "world_size", "checkpoint")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> TrainConfig:
    base = dict(method="sup", iterations=4, device="cpu", patch_size=(16, 16, 16), batch_size=2,
                net=NetConfig(width=4, out_channels=2), val_every=2, ckpt_every=2, max_val_cases=1)
    base.update(kw)
    return TrainConfig(**base)


def check_schema(events: list[dict]) -> None:
    for e in events:
        assert e["type"] in EVENT_TYPES
        missing = [f for f in (*COMMON_FIELDS, *REQUIRED_FIELDS[e["type"]]) if f not in e]
        assert not missing, f"{e['type']} event lacks {missing}: {e}"
        assert isinstance(e["time"], float) and isinstance(e["iteration"], int)


@pytest.mark.slow
def test_event_and_status_schema(project):
    Trainer(project, "r", tiny()).train()
    run = project.run_dir("r")
    events = read_events(run)
    check_schema(events)
    types = [e["type"] for e in events]
    assert types[0] == "started" and types[-1] == "done"
    assert {"progress", "validation", "checkpoint"} <= set(types)
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["iteration"] for e in progress] == [1, 2, 3, 4]
    assert progress[0]["losses"]["loss"] == progress[0]["loss"] and "loss_sup" in progress[0]["losses"]
    status = read_status(run)
    assert not [f for f in STATUS_FIELDS if f not in status]
    assert status["state"] == "done" and status["iteration"] == 4 and status["metrics"]["val_dice"] is not None


def test_failure_is_recorded(project, monkeypatch):
    tr = Trainer(project, "f", tiny())
    real = tr.method.loss

    def loss(trainer, batch, logits, it):
        if it == 2:
            raise ValueError("the loss exploded on purpose")
        return real(trainer, batch, logits, it)

    monkeypatch.setattr(tr.method, "loss", loss)
    outcome = tr.train()
    assert outcome.state == "failed" and outcome.exit_code == 1 and outcome.iteration == 2
    with pytest.raises(ValueError):
        outcome.raise_for_failure()
    events = read_events(project.run_dir("f"))
    check_schema(events)
    failed = events[-1]
    assert failed["type"] == "failed" and failed["iteration"] == 2
    assert failed["error"] == "ValueError: the loss exploded on purpose"
    assert "Traceback" in failed["traceback"] and failed["resume_from"] == 2
    status = read_status(project.run_dir("f"))
    assert status["state"] == "failed" and status["error"] == failed["error"]


def test_setup_failure_is_recorded(project, monkeypatch):
    monkeypatch.setattr(Trainer, "load_data", lambda self: (_ for _ in ()).throw(OSError("disk gone")))
    outcome = Trainer(project, "s", tiny()).train()
    assert outcome.state == "failed" and isinstance(outcome.exception, OSError)
    assert read_status(project.run_dir("s"))["error"] == "OSError: disk gone"


def test_out_of_memory_advice(project, monkeypatch):
    tr = Trainer(project, "oom", tiny(batch_size=4, labelled_bs=2))

    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tr.method, "loss", boom)
    outcome = tr.train()
    assert outcome.state == "failed" and isinstance(outcome.exception, OutOfMemory)
    assert isinstance(outcome.exception, FmabsError) and outcome.exit_code == 2
    msg = str(outcome.exception)
    assert "--batch-size 4" in msg and "--batch-size (e.g. 2)" in msg and "--patch-size (e.g. 16 16 16)" in msg
    failed = read_events(project.run_dir("oom"))[-1]
    assert failed["type"] == "failed" and failed["error"] == msg


def test_torn_last_line_is_repaired(tmp_path):
    log = RunLog(tmp_path)
    log.event("started", iteration=0)
    with open(log.events_path, "a") as fh:
        fh.write('{"type": "progress", "iter')  # a writer killed mid-line
    assert len(read_events(tmp_path)) == 1
    log.repair()
    log.event("progress", iteration=1)
    assert [e["type"] for e in read_events(tmp_path)] == ["started", "progress"]


def test_status_never_half_written(tmp_path):
    """A reader polling status.json while it is rewritten always gets complete JSON."""
    log = RunLog(tmp_path)
    log.update_status(state="running", iteration=0)
    stop, bad = threading.Event(), []

    def reader():
        while not stop.is_set():
            try:
                json.loads((tmp_path / "status.json").read_text())
            except json.JSONDecodeError as exc:
                bad.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(300):
        log.update_status(iteration=i, losses={"loss": 1.0 / (i + 1)}, padding="x" * 4000)
    stop.set()
    t.join()
    assert not bad

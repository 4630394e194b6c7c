"""Checkpoints: atomic writes, keep the last N plus best, corrupt or truncated files fall back."""

from __future__ import annotations

import logging

import pytest
import torch

from fmabs_core.runs.checkpoint import CheckpointStore, load_checkpoint, save_atomic


def state(i: int) -> dict:
    return {"iteration": i, "model": {"w": torch.full((64,), float(i))}}


def test_keep_last_and_best(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for i in (2, 4, 6):
        store.save(state(i), i)
    store.save_best(state(4))
    assert [i for i, _ in store.iteration_files()] == [4, 6]
    assert load_checkpoint(tmp_path / "best.pt")["iteration"] == 4
    assert store.load_latest()["iteration"] == 6
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path, keep_last=0)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "not_a_checkpoint"])
def test_corrupt_newest_falls_back(tmp_path, caplog, damage):
    store = CheckpointStore(tmp_path, keep_last=3)
    for i in (1, 2, 3):
        store.save(state(i), i)
    newest = store.path_for(3)
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:-100])
    elif damage == "garbage":
        newest.write_bytes(b"not a zip file" * 50)
    elif damage == "empty":
        newest.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(3)}, newest)
    with caplog.at_level(logging.WARNING, logger="fmabs_core.runs.checkpoint"):
        got = store.load_latest()
    assert got["iteration"] == 2
    assert any("iter_0000003.pt is unreadable" in r.message for r in caplog.records)
    assert (tmp_path / "iter_0000003.pt.corrupt").exists()
    assert [i for i, _ in store.iteration_files()] == [1, 2]  # out of the rotation


def test_untrusted_pickle_refused(tmp_path):
    """weights_only=True: a checkpoint that would run code on load is rejected, not executed."""
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "iter_0000001.pt"
    torch.save({"iteration": 1, "model": {}, "x": Evil()}, path)
    assert CheckpointStore(tmp_path).load_latest() is None
    assert not (tmp_path / "pwned").exists()


def test_killed_writer_leaves_only_a_temporary(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(state(1), 1)

    def dying_save(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_atomic(state(2), store.path_for(2))
    monkeypatch.undo()
    assert [i for i, _ in store.iteration_files()] == [1]
    (tmp_path / ".iter_0000002.pt.abc.tmp").write_bytes(b"left by kill -9")
    assert store.clean_temporary() == 1
    assert store.load_latest()["iteration"] == 1

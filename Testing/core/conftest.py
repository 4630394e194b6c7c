"""Fixtures shared by the engine, jobs and resume tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fmabs_core.data.project import Project, import_folder


@pytest.fixture(scope="session")
def template(tmp_path_factory, phantom_data) -> Path:
    """A phantom project with three cross-labelled training scans (copied per test by ``project``)."""
    from fmabs_core.cli.project_cmds import simulate_crosslabels

    root = tmp_path_factory.mktemp("template") / "proj"
    project, problems = import_folder(phantom_data, root, val_fraction=0.2, seed=0)
    assert not problems
    simulate_crosslabels(project, project.split("train")[:3], "centre", 0)
    return root


@pytest.fixture()
def project(template, tmp_path) -> Project:
    shutil.copytree(template, tmp_path / "proj")
    return Project(tmp_path / "proj")


@pytest.fixture()
def one_thread():
    """One torch thread: the same thread count in every run of a comparison (CPU reductions may depend
    on it), and no two threads spinning against each other on a shared two-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Fixtures for ``fmabs web``: a phantom project, the real server on loopback, headless Debian chromium.

The browser tests need the ``web`` extra (trame-slicer), Playwright (the ``test`` extra) and Debian's
``chromium`` (``.ci/run`` installs it; Playwright's own browser download is not used). When one is
missing they are skipped with a message saying what to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from web_helpers import Server, chromium_page


@pytest.fixture
def phantom_project(tmp_path) -> Path:
    """Four 32^3 phantom scans (with dense labels) imported as a project."""
    from fmabs_core.data.phantom import write_dataset
    from fmabs_core.data.project import import_folder

    data = write_dataset(tmp_path / "data", n_cases=4, shape=(32, 32, 32), seed=0)
    project, problems = import_folder(data, tmp_path / "project")
    assert problems == []
    return project.root


@pytest.fixture
def server_factory(tmp_path) -> Iterator:
    servers: list[Server] = []

    def start(project: Path, *extra: str, host: str = "127.0.0.1") -> Server:
        server = Server(project, tmp_path / f"server{len(servers)}.log", *extra, host=host)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def browser_page(tmp_path) -> Iterator:
    """A fresh headless chromium page (own profile folder), 1500x900."""
    with chromium_page(tmp_path / "chromium-profile") as page:
        yield page

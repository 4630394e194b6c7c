"""Ready for the 3D Slicer Extensions Index: the catalog entry and the checks the index runs, offline.

The index (github.com/Slicer/ExtensionsIndex, scripts/check_description_files.py) validates an entry
``<Extension>.json`` against its schema, checks the category, the repository name and the scm_url,
that the top-level CMake ``project()`` is the entry's name, that the icon and screenshot URLs are
http(s) URLs of images, and that a license file is at the root. Here the same checks run without the
network: the schema is a copy of the index's v1.0.1 (data/), and the image URLs must name files that
exist in this repository (what raw.githubusercontent.com serves once it is pushed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "FMABS.json"
SCHEMA = Path(__file__).parent / "data" / "slicer-extension-catalog-entry-schema-v1.0.1.json"
#: categories of the index's accepted list that fit this extension
CATEGORIES = {"Segmentation", "Active Learning"}


def _cmake_set(name: str) -> str:
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    found = re.findall(rf'set\s*\({name}\s*"([^"]+)"', text, re.IGNORECASE)
    assert found, f"CMakeLists.txt sets no {name}"
    return found[0]


def test_catalog_entry_validates_against_the_index_schema():
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    jsonschema.validate(entry, json.loads(SCHEMA.read_text(encoding="utf-8")))
    assert entry["$schema"].split("/")[-1].rstrip("#") == SCHEMA.name
    assert entry["category"] in CATEGORIES and entry["build_dependencies"] == ["PyTorch"]
    url = urlsplit(entry["scm_url"])
    assert url.scheme in ("git", "https") and "://" in entry["scm_url"]
    assert "slicer" in Path(url.path).stem.lower()  # the index asks the repository's name to say Slicer


def test_cmake_project_is_the_entry_name_and_not_prefixed_with_slicer():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    project = re.findall(r"project\s*\(\s*([^\s\)\n\r]+)", text, re.IGNORECASE)[0]
    assert project == ENTRY.stem == "FMABS"
    assert not project.lower().startswith("slicer")
    assert "PyTorch" in _cmake_set("EXTENSION_DEPENDS")
    description = _cmake_set("EXTENSION_DESCRIPTION")
    assert "three slices" in description and "NIfTI" in description


def test_icon_and_screenshots_are_urls_of_images_in_this_repository():
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    owner_repo = "/".join(urlsplit(entry["scm_url"]).path.strip("/").removesuffix(".git").split("/")[:2])
    urls = [_cmake_set("EXTENSION_ICONURL"), *_cmake_set("EXTENSION_SCREENSHOTURLS").split()]
    for url in urls:
        parts = urlsplit(url)
        assert parts.scheme == "https" and parts.netloc == "raw.githubusercontent.com", url
        owner, repo, branch, *path = parts.path.strip("/").split("/")
        assert f"{owner}/{repo}" == owner_repo and branch == entry["scm_revision"], url
        image = REPO.joinpath(*path)
        assert image.is_file() and image.suffix == ".png" and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url


def test_license_file_at_the_root_matches_the_package():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0" in text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text(encoding="utf-8")

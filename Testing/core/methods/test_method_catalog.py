"""fmabs_core/method_catalog.json (what the Slicer module lists without torch) equals the registry."""

from __future__ import annotations

import json
import subprocess
import sys

from fmabs_core import contract


def test_the_catalog_equals_what_fmabs_methods_says():
    from fmabs_core import methods

    current = json.loads(json.dumps(methods.describe(), default=str))
    assert contract.method_catalog() == current, (
        "fmabs_core/method_catalog.json is stale: regenerate it with "
        "`fmabs methods --json fmabs_core/method_catalog.json --overwrite`")


def test_reading_the_catalog_imports_no_torch():
    code = ("import sys\nfrom fmabs_core import contract\nassert contract.method_catalog()\n"
            "print('torch' in sys.modules, 'numpy' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]

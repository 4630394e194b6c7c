"""Small pieces the sub-commands share: progress bars and output helpers."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

from tqdm import tqdm


def progress(items: Iterable, desc: str = "", total: int | None = None) -> Iterable:
    """A tqdm bar on stderr; quiet when stderr is not a terminal except for the final summary."""
    return tqdm(items, desc=desc, total=total, dynamic_ncols=True, leave=False,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))

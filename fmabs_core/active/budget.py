"""The annotation budget (in scans) and the history of selection rounds in ``fmabs.json``.

What is spent is what exists on disk: the training scans that have a cross-label, plus the scans a
paused run asked the expert for (``pending``). Counting files rather than trusting a counter keeps
the budget honest across crashes, resumes and cross-labels drawn by hand.

A round record (``meta["rounds"]`` entry)::

    {"run": "r1", "round": 2, "kind": "warmup" | "active" | "suggest", "strategy": "her",
     "iteration": 120, "time": "2024-...Z", "unix_time": 1.7e9, "cases": ["la_003", ...],
     "scores": {"la_003": 0.41, ...}, "slices": {"la_003": {"axial": {...}, ...}},
     "status": "labelled" | "pending" | "suggested", "budget": 6}
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fmabs_core.data.project import Project
from fmabs_core.errors import InputError

WARMUP_FRACTION = 0.2


def warmup_count(budget: int) -> int:
    """Scans chosen at random before the model can score: 20 % of the budget, rounded half up, >= 1."""
    check_budget(budget)
    return min(budget, max(1, math.floor(budget * WARMUP_FRACTION + 0.5)))


def check_budget(budget: int | None) -> int:
    """A whole number of scans >= 1 (a float that is whole is accepted); anything else is an InputError."""
    ok = (not isinstance(budget, bool) and isinstance(budget, (int, float)) and math.isfinite(budget)
          and int(budget) == budget and budget >= 1)
    if not ok:
        raise InputError(f"active cross-labelling needs a budget of at least 1 scan (got --budget {budget})")
    return int(budget)


def round_sizes(budget: int, k: int, already: int = 0) -> list[int]:
    """Scans per round, warm-up first: e.g. budget 6, K 2 -> [1, 2, 2, 1]; the last round takes what is left.

    ``already`` cross-labelled scans count towards the warm-up (and the budget).
    """
    if k < 1:
        raise InputError(f"scans per round must be at least 1 (got -k/active_k {k})")
    budget = check_budget(budget)
    spent = min(already, budget)
    sizes = []
    warm = max(0, warmup_count(budget) - spent)
    if warm:
        sizes.append(warm)
    spent += warm
    while spent < budget:
        n = min(k, budget - spent)
        sizes.append(n)
        spent += n
    return sizes


def active_round_count(budget: int, k: int) -> int:
    """Rounds after the warm-up when nothing was labelled beforehand (fixes the default schedule)."""
    return math.ceil((check_budget(budget) - warmup_count(budget)) / k)


@dataclass
class BudgetState:
    total: int
    labelled: list[str]  # training scans with a cross-label on disk
    pending: list[str]  # asked of the expert, not labelled yet

    @property
    def spent(self) -> int:
        return len(set(self.labelled) | set(self.pending))

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.spent)

    def next_round(self, k: int) -> int:
        """Scans in the next round: K, or what is left of the budget."""
        return min(k, self.remaining)


def budget_state(project: Project, total: int, pending: list[str] | None = None) -> BudgetState:
    train = set(project.split("train"))
    labelled = [c for c in project.crosslabelled() if c in train]
    pending = [c for c in (pending or []) if c not in labelled]
    return BudgetState(check_budget(total), labelled, pending)


# ---- history in fmabs.json -----------------------------------------------------------------------
def now() -> dict[str, Any]:
    t = time.time()
    return {"time": datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds"), "unix_time": t}


def rounds(project: Project, run: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
    """The recorded rounds, optionally of one run and/or kind, oldest first."""
    out = project.read().get("rounds", []) or []
    return [r for r in out if (run is None or r.get("run") == run) and (kind is None or r.get("kind") == kind)]


def record_round(project: Project, record: dict[str, Any], budget: int | None = None) -> dict[str, Any]:
    """Append a round (adding the time stamp) and, when given, store the project's budget."""
    record = {**now(), **record}

    def change(meta: dict[str, Any]) -> None:
        meta.setdefault("rounds", []).append(record)
        if budget is not None:
            meta["budget"] = int(budget)

    project.update(change)
    return record


def set_round_status(project: Project, run: str, number: int, kind: str, status: str) -> None:
    """Mark a run's round (e.g. a paused round, once its cross-labels exist) as ``status``."""

    def change(meta: dict[str, Any]) -> None:
        for r in meta.get("rounds", []):
            if r.get("run") == run and r.get("round") == number and r.get("kind") == kind:
                r["status"] = status
                r["labelled_at"] = now()["time"]

    project.update(change)


def set_budget(project: Project, budget: int) -> None:
    budget = check_budget(budget)

    def change(meta: dict[str, Any]) -> None:
        meta["budget"] = budget

    project.update(change)

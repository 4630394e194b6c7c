"""Active cross-labelling: which scans (and which three slices) the expert should label next.

- :mod:`.strategies`: LC, HE, HER, random: ``score(probs, progress) -> float``, higher = more informative.
- :mod:`.budget`: the budget in scans, warm-up size, and the round history in ``fmabs.json``.
- :mod:`.suggest`: top-K selection and slice suggestions with canonical, file-grid and RAS positions.
- :mod:`.hook`: the rounds inside training (``fmabs train --active ... --budget ...``).
"""

from fmabs_core.active.strategies import STRATEGIES, Strategy, get_strategy, register

__all__ = ["STRATEGIES", "Strategy", "get_strategy", "register"]

"""Learning-rate (and weight-decay) schedules: linear warm-up, then cosine decay (Loshchilov & Hutter 2017).

Schedules are pure functions of the step, so a resumed run needs nothing but the step to continue.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0,
                  warmup_start: float = 0.0) -> float:
    """Value at ``step``: linear from ``warmup_start`` to ``base`` over ``warmup_steps``, then cosine to ``final``."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))

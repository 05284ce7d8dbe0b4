"""Server-side strategy allocation: which clients train PTQ and which QAT (paper §3.3, §4.2)."""

from fedhq.allocation.global_init import (
    Allocation,
    Strategy,
    geometric_segmentation,
    global_init,
    normalize_significance,
)

__all__ = ["Allocation", "Strategy", "geometric_segmentation", "global_init", "normalize_significance"]

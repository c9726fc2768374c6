"""Small statistics helpers the benchmarks, the demos and the status views share."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated between the closest ranks; NaN for no values.

    Interpolates like numpy's default ("inclusive" in `statistics.quantiles`), so the 0th and
    100th percentiles are the smallest and largest value.
    """
    if not values:
        return math.nan
    if len(values) == 1 or q <= 0:
        return float(min(values))
    if q >= 100:
        return float(max(values))
    # 1,000 cut points give every 0.1 percentile exactly; finer q interpolates between them.
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    position = q * 10 - 1
    low = math.floor(position)
    if low < 0:
        return float(min(values)) + (cuts[0] - float(min(values))) * (position + 1)
    high = min(low + 1, len(cuts) - 1)
    return cuts[low] + (cuts[high] - cuts[low]) * (position - low)

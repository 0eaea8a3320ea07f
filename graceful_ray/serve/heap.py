"""Keeping Python's cyclic garbage collector off long-lived records.

The comparator keeps up to ``max_tracked_records`` records in memory for late
feedback (a million by default), one GC-tracked object each. CPython's full
collection walks every tracked object and runs each time the old generation has
grown by a quarter, so a comparator holding a million records spent about 30%
of its CPU in the collector (``benchmarks/comparator_ceiling.py --gc both``
measures it), while those records can never be cyclic garbage: they are freed
by reference counting when they leave the index.

:meth:`LongLivedHeap.settle` is called after every flush: it collects the young
generations (where new garbage cycles are) and then freezes everything that
survived (``gc.freeze``), so later collections skip it. Frozen objects that do
turn into a cycle of garbage are not lost for good: every ``refresh_s`` they are
unfrozen and one full collection looks at them.
"""

from __future__ import annotations

import gc
import time
from typing import Callable


class LongLivedHeap:
    """The freeze / refresh policy; one per process that holds many long-lived objects."""

    def __init__(self, refresh_s: float = 600.0, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.refresh_s = refresh_s
        self._clock = clock
        self._refreshed = clock()

    def settle(self) -> None:
        """After a batch of work: free young garbage, then exempt the survivors."""
        if self._clock() - self._refreshed >= self.refresh_s:
            gc.unfreeze()
            gc.collect()  # the one full collection per refresh period
            self._refreshed = self._clock()
        else:
            gc.collect(1)
        gc.freeze()

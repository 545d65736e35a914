"""Small helpers shared across the package."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(*, total: int | None, desc: str, enabled: bool = True, unit: str = "it") -> tqdm:
    """A progress bar on stderr (hidden when ``enabled`` is false)."""
    # redraw often on a terminal, rarely in a log file (CI, pipes)
    interval = 0.1 if sys.stderr.isatty() else 15.0
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, unit=unit, dynamic_ncols=True,
                leave=True, mininterval=interval, maxinterval=max(10.0, interval))

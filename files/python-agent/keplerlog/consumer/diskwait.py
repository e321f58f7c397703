"""Retry one step that must not be skipped until the disk has room again.

Some writes cannot be given up: the state of a batch that is already durable, or the roll-forward
of a dead consumer's committed intent. Raising would only crash-loop the service and export no
metrics, so these wait instead, and the wait looks the same as a paused batch: each refused try
counts in `disk_full_total` and `disk_full_paused` is 1 until the step succeeds. Any other error
is raised: only a full disk is worth waiting for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from .files import DISK_FULL_ERRNOS
from .metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY_S = 0.1


def wait_out_full_disk(
    step: Callable[[], T],
    metrics: Metrics,
    what: str,
    max_delay_s: float,
    sleep: Callable[[float], None] = time.sleep,
    stopping: Callable[[], bool] = lambda: False,
) -> T | None:
    """Run `step` until it does not fail with ENOSPC/EDQUOT; None if `stopping()` first.

    The pause doubles from FIRST_DELAY_S up to `max_delay_s`, which bounds how long a stop
    request (checked before each try) waits.
    """
    delay = FIRST_DELAY_S
    while not stopping():
        try:
            result = step()
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            metrics.inc("disk_full")
            metrics.gauges["disk_full_paused"] = 1
            log.error("disk full (%s) %s; retry in %.1fs", exc.strerror, what, delay)
            sleep(delay)
            delay = min(delay * 2, max_delay_s)
            continue
        metrics.gauges["disk_full_paused"] = 0
        return result
    return None

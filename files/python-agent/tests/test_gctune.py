"""gctune.settle(): what start-up made is frozen; the thresholds stay; cycles are still collected.

Each check runs in a fresh interpreter: settle() changes the collector for the whole process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.strip()


def test_settle_freezes_what_start_up_made_and_keeps_the_thresholds():
    got = _run(
        """
        import gc
        from keplerlog import gctune
        before = gc.get_freeze_count(), gc.get_threshold()
        gctune.settle()
        print(before[0], gc.get_freeze_count() > 1000, gc.get_threshold() == before[1])
        """
    )
    assert got == "0 True True"


def test_a_cycle_made_after_settle_is_still_collected_without_asking():
    """Past the young generation's threshold of new container objects a collection runs by
    itself and frees a cycle made after the freeze."""
    got = _run(
        """
        import gc, weakref
        from keplerlog import gctune
        gctune.settle()

        class Node:
            pass

        def cycle():
            a, b = Node(), Node()
            a.other, b.other = b, a
            return weakref.ref(a)

        ref = cycle()
        alive = ref() is not None
        keep = [[] for _ in range(gc.get_threshold()[0] * 20)]
        print(alive, ref() is None)
        """
    )
    assert got == "True True"

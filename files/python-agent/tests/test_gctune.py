"""gctune.settle(): start-up objects frozen, young collections rarer, cycles still collected.

Each check runs in a fresh interpreter: settle() changes the collector for the whole process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from keplerlog import gctune


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.strip()


def test_settle_freezes_what_start_up_made_and_raises_the_young_threshold():
    got = _run(
        """
        import gc
        from keplerlog import gctune
        before = gc.get_freeze_count(), gc.get_threshold()
        gctune.settle()
        print(before[0], before[1][0], gc.get_freeze_count() > 1000, gc.get_threshold())
        """
    )
    assert got == f"0 700 True ({gctune.YOUNG_THRESHOLD}, 10, 10)"


def test_a_cycle_is_still_collected_past_the_young_threshold():
    """Past YOUNG_THRESHOLD new container objects a collection runs by itself and frees a
    cycle; below it the cycle stays (the collector really runs less often)."""
    got = _run(
        f"""
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
        keep = [[] for _ in range({gctune.YOUNG_THRESHOLD} // 2)]
        below = ref() is not None
        keep += [[] for _ in range({gctune.YOUNG_THRESHOLD} * 2)]
        print(below, ref() is None)
        """
    )
    assert got == "True True"

"""The read coalescing window (pacer.py): with `read_coalesce_lines` (default 20), about that many
lines a read, between MIN_WINDOW_S and `read_coalesce_ms`, so a busy file's lines wait less than a
fixed 100 ms while a trickle still costs one read per 100 ms; 0 keeps the fixed window."""

from __future__ import annotations

import threading
import time

import pytest
from agent_support import append, in_process, lines, write_config

from keplerlog.agent.config import ConfigError, load
from keplerlog.agent.pacer import MIN_WINDOW_S, ReadPacer


def _steady(pacer: ReadPacer, rate: float, reads: int = 5) -> None:
    """Reads that each bring what `rate` lines/s wrote since the one before."""
    t = max(1000.0, pacer.last_read + 1)
    pacer.read(t, 1)
    for _ in range(reads):
        w = pacer.window_s
        t += w
        pacer.read(t, max(1, round(rate * w)))


@pytest.mark.parametrize(
    ("rate", "window"),
    [
        (50, 0.1),  # 5 lines in 100 ms: the cap, as with the fixed window
        (200, 0.1),  # the trickle the CPU bench measures: still one read per 100 ms
        (500, 0.04),  # 20 lines take 40 ms
        (1000, 0.02),  # 20 ms: the floor
        (4000, MIN_WINDOW_S),  # past the floor: 5 ms would be wanted
        (100_000, MIN_WINDOW_S),  # far past it: 0.2 ms would be wanted
    ],
)
def test_the_window_is_the_time_the_lines_take_between_the_floor_and_the_cap(rate, window):
    pacer = ReadPacer(0.1, 20)
    _steady(pacer, rate)
    assert pacer.window_s == pytest.approx(window, rel=0.05)


def test_the_window_follows_the_rate_down_and_up_again():
    pacer = ReadPacer(0.1, 20)
    _steady(pacer, 500)
    assert pacer.window_s == pytest.approx(0.04, rel=0.05)
    _steady(pacer, 100)
    assert pacer.window_s == pytest.approx(0.1)
    _steady(pacer, 500)
    assert pacer.window_s == pytest.approx(0.04, rel=0.05)


def test_a_write_after_a_quiet_spell_is_read_at_once():
    pacer = ReadPacer(0.1, 20)
    _steady(pacer, 1000)
    quiet_until = pacer.last_read + 30
    assert pacer.delay(quiet_until) < 0
    pacer.read(quiet_until, 1)  # one line after 30 s: a rate of nearly nothing
    assert pacer.window_s == pytest.approx(0.1)  # the next write waits at most the cap
    assert pacer.delay(quiet_until) == pytest.approx(0.1)


def test_a_piece_of_a_long_line_restarts_the_window_but_says_nothing_of_the_rate():
    pacer = ReadPacer(0.1, 20)
    _steady(pacer, 1000)
    window, t = pacer.window_s, pacer.last_read + 0.5
    pacer.read(t, 0)  # bytes, but no complete line
    assert pacer.window_s == window
    assert pacer.delay(t) == pytest.approx(window)


def test_zero_lines_per_read_keeps_the_fixed_window():
    pacer = ReadPacer(0.1, 0)
    _steady(pacer, 50_000)
    assert pacer.window_s == 0.1


def test_the_setting_is_checked(tmp_path, logdir):
    pattern = [str(logdir / "*.log")]
    path = write_config(tmp_path, "127.0.0.1:1", "t", pattern, limits={"read_coalesce_lines": -1})
    with pytest.raises(ConfigError, match="read_coalesce_lines"):
        load(str(path))
    path = write_config(tmp_path, "127.0.0.1:1", "t", pattern)
    assert load(str(path)).limits.read_coalesce_lines == 20  # on: paced by the rate


@pytest.mark.parametrize(("lines_per_read", "shorter"), [(20, True), (0, False)])
def test_the_running_agent_reads_a_busy_file_more_often(tmp_path, logdir, lines_per_read, shorter):
    """About 1,000 lines/s into one file for 1.5 s: the running agent's window shrinks well below
    read_coalesce_ms (about 20 ms), and stays there with read_coalesce_lines 0."""
    busy = logdir / "busy.log"
    append(busy, lines("first", 1))
    agent, sender = in_process(
        tmp_path, logdir, auto_ack=True, read_coalesce_ms=100, read_coalesce_lines=lines_per_read
    )
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        start = time.monotonic()
        n, windows = 0, []
        while (now := time.monotonic()) < start + 1.5:
            append(busy, lines("busy", 5, start=n))
            n += 5
            if now > start + 0.5:  # the window while the file is busy (the last read may be short)
                windows.append(agent.pacer.window_s)
            time.sleep(0.005)
        written = busy.stat().st_size
        deadline = time.monotonic() + 10
        while sum(len(v) for v, _ in sender.sent) < written:
            assert time.monotonic() < deadline, "not everything shipped"
            time.sleep(0.02)
        assert sum(len(v) for v, _ in sender.sent) == written  # nothing twice either
        rate = n / 1.5
        assert rate > 300, f"the writer managed only {rate:.0f} lines/s: the test proves nothing"
        windows.sort()
        if shorter:
            assert windows[len(windows) // 2] < 0.05, (windows, rate)
        else:
            assert set(windows) == {0.1}
    finally:
        agent.request_stop()
        thread.join(10)

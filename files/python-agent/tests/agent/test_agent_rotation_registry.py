"""Thousands of rotations under an `app.log*` glob: what the agent remembers stays bounded.

A glob that matches the rotated files too (`app.log*`) keeps every finished file in the agent's
registry of closed files (so that an unchanged one is never re-read) for as long as the file
exists. Rotations with a bounded number of backups must keep that registry, the open files and
the state file bounded as well, however many rotations there were, and ship every line once.
"""

from __future__ import annotations

import json
import os
import threading
import time

from agent_support import append, in_process, lines

ROTATIONS = 2000
BACKUPS = 5
LINES_PER_FILE = 5


def _wait(check, timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.005)


def test_thousands_of_rotations_keep_the_registry_and_the_state_bounded(tmp_path, logdir):
    log = logdir / "app.log"
    agent, sender = in_process(
        tmp_path, logdir, auto_ack=True, paths=[str(logdir / "app.log*")], close_inactive_s=0.2
    )
    thread = threading.Thread(target=agent.run)
    thread.start()
    written: dict[int, bytes] = {}
    shipped: set[bytes] = set()
    seen = 0

    def has(data: bytes) -> bool:
        """Tell whether every line of `data` was sent (reads only the records sent since)."""
        nonlocal seen
        for value, _ in sender.sent[seen:]:
            shipped.update(value.splitlines())
            seen += 1
        return all(line in shipped for line in data.splitlines())

    peak_closed = peak_open = peak_state = 0
    try:
        for i in range(ROTATIONS):
            data = lines(f"r{i}", LINES_PER_FILE)
            append(log, data)
            written[i] = data
            os.rename(log, logdir / f"app.log.{i}")  # dateext-style: a new name per rotation
            old = logdir / f"app.log.{i - BACKUPS}"
            if i >= BACKUPS:
                # the oldest backup goes once shipped (a file deleted unread would be a loss
                # of the test's own making, not of the agent)
                _wait(lambda i=i: has(written[i - BACKUPS]), what=f"file {i - BACKUPS}")
                old.unlink()
            peak_closed = max(peak_closed, len(agent.fileset.closed))
            peak_open = max(peak_open, len(agent.files))
            state = tmp_path / "state" / "agent-state.json"
            if state.exists():
                peak_state = max(peak_state, state.stat().st_size)
        total = sum(len(d) for d in written.values())
        _wait(lambda: all(has(d) for d in written.values()), what="the last files")
        time.sleep(1)  # idle: finished files close, the registry settles
    finally:
        agent.request_stop()
        thread.join(20)
    assert not thread.is_alive()
    # the fault really happened: thousands of files came and went under the glob
    assert len(list(logdir.iterdir())) == BACKUPS
    # every line shipped exactly once (auto-acked, so no re-send either)
    assert sum(len(v) for v, _ in sender.sent) == total
    shipped = b"".join(v for v, _ in sender.sent)
    assert sorted(shipped.splitlines()) == sorted(b"".join(written.values()).splitlines())
    # and what the agent remembers is bounded by the files that exist, not by the rotations
    # Deleted files stay open for close_inactive_s (the application may still write to them)
    # and finished ones stay registered until the next rescan: at this rotation rate that is
    # dozens, well below the rotations; once quiet, no more than the files that exist.
    assert peak_closed + peak_open < ROTATIONS / 5, (peak_closed, peak_open)
    assert len(agent.fileset.closed) + len(agent.files) <= BACKUPS + 1, agent.fileset.closed
    saved = json.loads((tmp_path / "state" / "agent-state.json").read_text())["files"]
    assert len(saved) <= BACKUPS + 1, len(saved)
    # one entry is ~300 bytes: the files that exist at the end, and never every rotation's
    final = (tmp_path / "state" / "agent-state.json").stat().st_size
    assert final < 400 * (BACKUPS + 1), final
    assert peak_state < 400 * ROTATIONS / 5, peak_state

"""More files than descriptors: every file shipped once, deleted files released, new ones seen.

The agent runs with RLIMIT_NOFILE 128, so at most 64 files are open at once (64 descriptors are
kept for Kafka's sockets and the rest). 400 files appear at once: the ones beyond the limit wait
for a slot, idle files are closed (remembered by identity) to make room, and none is skipped.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time

import pytest
from agent_support import AgentProcess, append, first_pass, in_process, lines, write_config

NOFILE = 128
FILES = 400


@pytest.mark.kafka
def test_more_files_than_descriptors(tmp_path, kafka, topic, logdir, reader):
    paths_glob = [str(logdir / "*.log")]
    cfg = write_config(tmp_path, kafka.bootstrap, topic, paths_glob, limits={"close_inactive_s": 1})
    agent = AgentProcess(cfg, tmp_path / "agent.out").start(nofile=NOFILE)
    try:
        reader.wait_for(lambda: agent.open_fds() > 0)
        time.sleep(2)
        baseline = agent.open_fds()
        paths = [logdir / f"f{i:04d}.log" for i in range(FILES)]
        for i, path in enumerate(paths):
            append(path, lines(f"file{i}", 20))
        expected = {str(p): [p.read_bytes()] for p in paths}
        peak = 0

        def all_there() -> bool:
            nonlocal peak
            peak = max(peak, agent.open_fds())
            got = reader.by_path()
            return all(got.get(p) == v for p, v in expected.items())

        reader.wait_for(all_there, timeout=120)
        assert peak <= NOFILE  # the fault: more files than the process can hold open at once
        out = agent.output()
        assert "files wait for a descriptor slot" in out
        # deleted files are finished and closed: their space released, descriptors back
        for path in paths:
            path.unlink()
        deadline = time.monotonic() + 30
        while agent.open_fds() > baseline + 2:
            assert time.monotonic() < deadline, f"{agent.open_fds()} fds open, baseline {baseline}"
            time.sleep(0.5)
        late = logdir / "late.log"
        t0 = time.monotonic()
        append(late, b"one late line\n")
        reader.wait_contents({str(late): [late.read_bytes()]}, timeout=5)
        took = time.monotonic() - t0
        print(f"{FILES} files, RLIMIT_NOFILE {NOFILE}: peak {peak} fds, late file in {took:.2f} s")
    finally:
        assert agent.stop() == 0, agent.output()
    # exactly once: one id per path, and no (id, offset) twice
    for fid, recs in reader.records.items():
        offsets = [o for o, _ in recs]
        assert len(offsets) == len(set(offsets)), f"{fid}: a record arrived twice"
    assert len(reader.paths) == FILES + 1


def test_a_rescan_without_descriptors_marks_nothing_deleted(tmp_path, logdir, monkeypatch):
    for i in range(3):
        append(logdir / f"a{i}.log", lines("a", 5))
    agent, _ = in_process(tmp_path, logdir, auto_ack=True)
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(agent.files) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        real = os.scandir

        def no_fds(path="."):
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(os, "scandir", no_fds)
        agent.fileset.next_scan = 0.0
        agent.waker.wake()
        deadline = time.monotonic() + 10
        while agent.counters.fd_exhausted == 0:
            assert time.monotonic() < deadline, "no rescan"
            time.sleep(0.05)
        time.sleep(0.3)
        assert agent.counters.rotations == 0
        assert not any(f.detached for f in agent.files.values())
        monkeypatch.setattr(os, "scandir", real)
    finally:
        agent.request_stop()
        thread.join(10)


def test_an_idle_file_is_closed_then_resumed_from_its_offset_when_it_grows(tmp_path, logdir):
    """close_idle_s: past it the file is closed; growing, or renamed away and grown (even after
    the agent saw the rename), it is resumed from its acknowledged offset under the same id:
    nothing shipped twice or skipped."""
    log, other = logdir / "a.log", logdir / "b.log"
    append(log, lines("first", 50))
    append(other, lines("other", 50))
    agent, sender = in_process(tmp_path, logdir, auto_ack=True, close_idle_s=0.5)
    thread = threading.Thread(target=agent.run)
    thread.start()

    def wait(check, what: str) -> None:
        # idle files are closed at a rescan: every 10 s when inotify watches all of them
        deadline = time.monotonic() + 30
        while not check():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    try:
        wait(lambda: len(agent.closed) == 2 and not agent.files, "idle files not closed")
        closed_before = agent.counters.files_closed
        append(log, lines("second", 30))  # grows while closed: reopened at its offset
        both = log.stat().st_size + other.stat().st_size
        wait(lambda: sum(len(v) for v, _ in sender.sent) == both, "a.log not resumed")
        st = other.stat()
        key = (st.st_dev, st.st_ino)
        assert key in agent.closed
        # Renamed out of the glob while closed (the rename wakes a rescan at once); the writer
        # still holds it and adds lines only after the agent saw the rename, as an application
        # does before it reopens its log. The wait makes that order certain: before, the rescan
        # dropped the file at its old size and the late lines were never read.
        os.rename(other, logdir / "b.old")
        wait(lambda: key not in agent.closed, "the rename not seen")
        with (logdir / "b.old").open("ab") as fh:
            fh.write(lines("late", 20))
        total = log.stat().st_size + (logdir / "b.old").stat().st_size
        wait(lambda: sum(len(v) for v, _ in sender.sent) == total, "b.old not finished")
    finally:
        agent.request_stop()
        thread.join(10)
    assert closed_before == 2
    by_file: dict[str, bytes] = {}
    for value, token in sender.sent:
        stream, offset = token[1], token[2]
        got = by_file.setdefault(stream.file_id, b"")
        assert offset == len(got), "a gap or a re-send"
        by_file[stream.file_id] = got + value
    assert sorted(by_file.values()) == sorted([log.read_bytes(), (logdir / "b.old").read_bytes()])


def _run(agent):
    thread = threading.Thread(target=agent.run)
    thread.start()
    return thread


def _wait(check, what: str, timeout: float = 10) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.02)
    return time.monotonic() - t0


def _quiet_files_and_a_busy_one(tmp_path, logdir):
    """300 quiet files and one busy one, the agent running in process: (agent, sender, thread,
    the busy file)."""
    for i in range(300):
        append(logdir / f"quiet-{i:03d}.log", lines(f"q{i}", 2))
    busy = logdir / "busy.log"
    append(busy, lines("busy", 1))
    agent, sender = in_process(tmp_path, logdir, auto_ack=True, read_coalesce_ms=20)
    return agent, sender, _run(agent), busy


def test_only_files_inotify_names_are_looked_at(tmp_path, logdir, monkeypatch):
    """300 quiet files next to one busy one: a write costs a look at that file, not at all 301.

    Before, every wake-up re-stat'ed every open file and every second re-read each one's first
    bytes: at 10,000 files that was 10 % of a core with nothing written.
    """
    from keplerlog.agent.tailer import TailedFile

    agent, sender, thread, busy = _quiet_files_and_a_busy_one(tmp_path, logdir)
    looks = {"n": 0}
    real = TailedFile.refresh

    def counted(self, mono):
        looks["n"] += 1
        return real(self, mono)

    try:
        total = sum(p.stat().st_size for p in logdir.iterdir())
        _wait(lambda: sum(len(v) for v, _ in sender.sent) == total, "initial files not shipped")
        time.sleep(1.5)  # past the first rescan and sweep
        monkeypatch.setattr(TailedFile, "refresh", counted)
        for n in range(40):  # 40 writes, 50 ms apart: about 40 wake-ups
            append(busy, lines(f"more{n}", 1))
            time.sleep(0.05)
        total = sum(p.stat().st_size for p in logdir.iterdir())
        _wait(lambda: sum(len(v) for v, _ in sender.sent) == total, "busy file not shipped")
    finally:
        agent.request_stop()
        thread.join(10)
    assert agent.fileset.watched_all  # the fault condition: every file is in a watched directory
    # every-file looks would be ~40 x 301 = 12,000; one periodic sweep of 301 may fall inside
    assert looks["n"] < 1000, f"{looks['n']} file looks for 40 writes to one file"


def test_a_loop_step_visits_the_files_that_changed_not_every_open_one(tmp_path, logdir, monkeypatch):
    """300 quiet files next to one busy one: the read pass, the held-bytes sum, the timed
    flushes, the loop's timeout and the finishing of rotated files visit the busy file, not
    all 301 on every wake-up (a visit: asking a file whether it is read to its end, or what its
    assembler holds). A sweep still visits every file, every FINGERPRINT_SWEEP_WATCHED_S.
    """
    from keplerlog.agent.assembler import Assembler
    from keplerlog.agent.tailer import TailedFile

    agent, sender, thread, busy = _quiet_files_and_a_busy_one(tmp_path, logdir)
    visits = {"n": 0}
    at_eof, held = TailedFile.at_eof.fget, Assembler.held.fget

    def counted(getter):
        def get(self):
            visits["n"] += 1
            return getter(self)

        return property(get)

    try:
        total = sum(p.stat().st_size for p in logdir.iterdir())
        _wait(lambda: sum(len(v) for v, _ in sender.sent) == total, "initial files not shipped")
        time.sleep(1.5)  # past the first rescan and sweep
        monkeypatch.setattr(TailedFile, "at_eof", counted(at_eof))
        monkeypatch.setattr(Assembler, "held", counted(held))
        sweeps = agent.reader.next_fp_check
        for n in range(40):  # 40 writes, 50 ms apart: about 40 wake-ups
            append(busy, lines(f"more{n}", 1))
            time.sleep(0.05)
        total = sum(p.stat().st_size for p in logdir.iterdir())
        _wait(lambda: sum(len(v) for v, _ in sender.sent) == total, "busy file not shipped")
        swept = agent.reader.next_fp_check != sweeps
        looked = visits["n"]  # not the shutdown's: it reads every file to its end
    finally:
        agent.request_stop()
        thread.join(10)
    assert agent.fileset.watched_all  # the fault condition: every file is in a watched directory
    assert agent.counters.lines_read >= 300 + 41  # every write was read
    # every-file visits would be > 40 wake-ups x 301 files x 3 loops = 36,000; a periodic
    # sweep (which visits all 301 a few times) may fall inside the window
    limit = 40 * 30 + (2000 if swept else 0)
    assert looked < limit, f"{looked} file visits for 40 writes to one file (swept: {swept})"


def test_a_glob_through_subdirectories_is_still_looked_at_every_second(tmp_path, logdir):
    """Writes to files in subdirectories are not named by the base directory's inotify watch."""
    sub = logdir / "svc"
    sub.mkdir()
    log = sub / "app.log"
    append(log, lines("first", 5))
    agent, sender = in_process(tmp_path, logdir, auto_ack=True, paths=[str(logdir / "*" / "app.log")])
    thread = _run(agent)
    try:
        _wait(lambda: sum(len(v) for v, _ in sender.sent) == log.stat().st_size, "first lines")
        time.sleep(1.5)
        append(log, lines("later", 5))
        took = _wait(lambda: sum(len(v) for v, _ in sender.sent) == log.stat().st_size, "later lines")
    finally:
        agent.request_stop()
        thread.join(10)
    assert not agent.fileset.watched_all
    assert took < 3.0, f"a write in a subdirectory took {took:.1f} s to be shipped"


def test_a_file_closed_for_idleness_is_reopened_at_once_when_written(tmp_path, logdir):
    """The periodic rescan is 10 s when inotify covers every file; a write to a closed file must
    not wait for it (the end-to-end delay target is 4 s)."""
    log = logdir / "a.log"
    append(log, lines("first", 5))
    agent, sender = in_process(tmp_path, logdir, auto_ack=True, close_idle_s=0.3)
    thread = _run(agent)
    try:
        # closed at a rescan, which comes every 10 s when inotify watches every file
        _wait(lambda: len(agent.closed) == 1 and not agent.files, "idle file not closed", timeout=30)
        time.sleep(1.5)  # the rescan after closing it is past: the next periodic one is 10 s away
        assert agent.fileset.watched_all
        append(log, lines("second", 5))
        took = _wait(lambda: sum(len(v) for v, _ in sender.sent) == log.stat().st_size, "not resumed")
    finally:
        agent.request_stop()
        thread.join(10)
    assert took < 2.0, f"a write to an idle-closed file took {took:.1f} s to be shipped"


def _close(agent) -> None:
    for f in agent.files.values():
        f.close()
    agent.watcher.close()
    agent.waker.close()


def test_a_restart_with_more_known_files_than_slots_keeps_to_the_limit(tmp_path, logdir, caplog):
    """At a restart, files a glob still matches that wait for a descriptor slot have not moved:
    they wait, remembered by identity and in the state file, and resume from their offsets. They
    must not be taken for files rotated while the agent was stopped and opened past the limit
    (with the limit near RLIMIT_NOFILE such an open fails, and the file's state was dropped)."""
    paths = [logdir / f"f{i}.log" for i in range(5)]
    for p in paths:
        append(p, lines(p.stem, 10))
    agent, sender = in_process(tmp_path, logdir, auto_ack=True)
    try:
        first_pass(agent, sender)
        agent.ledger.checkpoint(agent.fileset.closed)
        ids = {f.path: f.stream.file_id for f in agent.files.values()}
    finally:
        _close(agent)
    assert len(ids) == 5
    first = {p: p.stat().st_size for p in paths}
    for p in paths:
        append(p, lines(p.stem + "-again", 10))

    agent, sender = in_process(tmp_path, logdir, auto_ack=True, max_open_files=2)
    caplog.set_level(logging.INFO, logger="keplerlog.agent")
    try:
        sender.connect()
        mono = time.monotonic()
        agent.fileset.scan(mono)
        assert len(agent.files) == 2 and agent.fileset.waiting == 3
        assert "rotated" not in caplog.text
        agent.ledger.checkpoint(agent.fileset.closed)  # the waiting files' states stay in it
        state = json.loads((tmp_path / "state" / "agent-state.json").read_text())["files"]
        assert sorted(state) == sorted(ids.values())
        for _ in range(5):  # read, acknowledge, close idle files to make room, open the next ones
            agent.reader.read_all(time.time(), mono)
            agent.ledger.results()
            mono += 2  # past close_inactive_s (1 s), the idle time that frees a slot for waiters
            agent.fileset.scan(mono)
            assert len(agent.files) <= 2
    finally:
        _close(agent)
    assert agent.counters.rotations == 0
    shipped: dict[str, bytes] = {}
    for value, token in sender.sent:
        stream, offset = token[1], token[2]
        got = shipped.setdefault(stream.file_id, b"")
        assert offset == first_offset(first, ids, stream.file_id) + len(got), "a gap or a re-send"
        shipped[stream.file_id] = got + value
    assert shipped == {ids[str(p)]: p.read_bytes()[first[p] :] for p in paths}


def first_offset(first, ids, file_id: str) -> int:
    (path,) = [p for p in first if ids[str(p)] == file_id]
    return first[path]


@pytest.mark.parametrize(("close_idle_s", "period"), [(300, 30.0), (1, 1.0), (0, 30.0)])
def test_the_watched_rescan_period_is_30_s_unless_close_idle_s_is_shorter(
    tmp_path, logdir, close_idle_s, period
):
    """Every directory watched: the safety-net rescan runs every RESCAN_WATCHED_S (30 s), not every
    second. Idle files are closed at a rescan, so a shorter close_idle_s shortens the period (a
    1 s close_idle_s waited 30 s for its close); 0 (never close) leaves it at 30 s."""
    from keplerlog.agent.fileset import RESCAN_WATCHED_S

    append(logdir / "app.log", lines("x", 3))
    agent, _ = in_process(tmp_path, logdir, auto_ack=True, close_idle_s=close_idle_s)
    try:
        mono = time.monotonic()
        agent.fileset.scan(mono)
        assert agent.fileset.watched_all and not agent.fileset.waiting
        assert RESCAN_WATCHED_S == 30.0
        assert agent.fileset.next_scan == pytest.approx(mono + period)
    finally:
        for f in agent.files.values():
            f.close()
        agent.watcher.close()
        agent.waker.close()

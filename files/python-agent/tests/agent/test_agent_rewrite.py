"""A file truncated and rewritten with the same first bytes before the agent looks again.

The size check (smaller than what was read) misses a rewrite that is already as long as the
old read offset, and the fingerprint check (first <= 1 KiB) misses one that starts with the
same bytes: a small file written again with the same lines (`> app.log`, same output), or a
file whose first KiB is a fixed banner. Its new lines must still arrive, once, under a new
`kl.file`, with the truncation counted.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from agent_support import AgentProcess, append, lines, metrics, write_config

from keplerlog.agent.config import InputConfig
from keplerlog.agent.identity import FINGERPRINT_BYTES
from keplerlog.agent.tailer import REWRITE_CONFIRM_S, AssemblerSettings, TailedFile
from keplerlog.testing.kafka_node import free_port

BANNER = b"".join(b"BANNER %04d =========================================\n" % i for i in range(40))
assert len(BANNER) > 2 * FINGERPRINT_BYTES


def _rewrite(path: Path, data: bytes) -> None:
    """What `> path` followed by a write of `data` does, in one go."""
    with path.open("r+b") as fh:
        fh.truncate(0)
        fh.write(data)


# -- the detection rules, without a broker -----------------------------------------------------


def _follow(path: Path) -> TailedFile:
    fd = os.open(path, os.O_RDONLY)
    settings = AssemblerSettings(max_record_bytes=65536, max_line_bytes=65536, partial_timeout_s=5)
    inp = InputConfig((str(path),), "m")
    return TailedFile.open(str(path), fd, os.fstat(fd), inp, settings, identity=None, offset=0, mono=0.0)


def _bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_modified_without_growth_is_a_rewrite_only_if_it_stays_that_size(tmp_path):
    """mtime moving while the size does not is also what an append looks like between its mtime
    update and its size update: only a file that then stays put is taken as rewritten."""
    p = tmp_path / "a.log"
    p.write_bytes(lines("small", 5))
    f = _follow(p)
    try:
        f.read(1 << 20, 1000.0, 1.0)
        _bump_mtime(p)
        assert f.refresh(2.0)
        assert not f.truncated(check_fingerprint=True)  # not yet: an append may be under way
        append(p, lines("appended", 1))  # it was one: the size grows, nothing was rewritten
        f.refresh(2.0 + REWRITE_CONFIRM_S)
        assert not f.truncated(check_fingerprint=True)
        f.read(1 << 20, 1000.0, 4.0)
        _bump_mtime(p)  # now the same bytes are "written again" and nothing follows
        f.refresh(5.0)
        assert not f.truncated(check_fingerprint=True)
        f.refresh(5.0 + REWRITE_CONFIRM_S)
        assert f.truncated(check_fingerprint=False)
    finally:
        f.close()


def test_a_large_file_rewritten_with_the_same_bytes_is_not_taken_as_truncated(tmp_path):
    """Beyond FINGERPRINT_BYTES a same-size, same-content change (touch) is not a rewrite: re-sending
    a whole large file for a touch would cost far more than it could ever save."""
    p = tmp_path / "a.log"
    p.write_bytes(BANNER + lines("big", 20))
    f = _follow(p)
    try:
        f.read(1 << 20, 1000.0, 1.0)
        _bump_mtime(p)
        assert f.refresh(2.0)
        assert not f.truncated(check_fingerprint=True)
        f.refresh(10.0)
        assert not f.truncated(check_fingerprint=True)
    finally:
        f.close()


def test_the_bytes_before_the_read_offset_are_checked_after_a_rewind(tmp_path):
    """A rewind (failed send) moves the read offset back; bytes read beyond it still count."""
    p = tmp_path / "a.log"
    p.write_bytes(BANNER + lines("big", 20))
    f = _follow(p)
    try:
        f.read(1 << 20, 1000.0, 1.0)
        f.rewind(len(BANNER))
        _rewrite(p, BANNER + lines("new", 20))
        f.refresh(2.0)
        assert f.truncated(check_fingerprint=True)
    finally:
        f.close()


# -- real Kafka ----------------------------------------------------------------------------------

CASES = {
    # smaller than the fingerprint, written again with the very same bytes: only mtime tells
    "small-same-bytes": (lines("small", 5), lines("small", 5)),
    # same first KiB (a banner), longer than the old read offset: the bytes before it differ
    "same-first-kib-longer": (BANNER + lines("old", 20), BANNER + lines("new", 60)),
    # same first KiB, exactly as long as before: no growth at all
    "same-first-kib-same-size": (BANNER + lines("old", 20), BANNER + lines("new", 20)),
}


@pytest.mark.kafka
@pytest.mark.parametrize("case", sorted(CASES))
def test_rewrite_with_the_same_first_bytes_is_shipped_as_a_new_file(
    tmp_path, kafka, topic, logdir, reader, case
):
    old, new = CASES[case]
    log = logdir / "app.log"
    append(log, old)
    port = free_port()
    cfg = write_config(tmp_path, kafka.bootstrap, topic, [str(logdir / "*.log")], metrics={"port": port})
    agent = AgentProcess(cfg, tmp_path / "agent.out").start()
    try:
        reader.wait_contents({str(log): [old]})
        before = log.stat().st_mtime_ns
        time.sleep(0.05)  # past the file system's timestamp granularity
        agent.signal(signal.SIGSTOP)  # the rewrite is complete before the agent looks again
        _rewrite(log, new)
        assert log.stat().st_mtime_ns != before
        agent.signal(signal.SIGCONT)
        reader.wait_contents({str(log): [old, new]})
        time.sleep(1.5)  # anything shipped twice would show up by now
        reader.poll()
        m = metrics(port)
    finally:
        agent.signal(signal.SIGCONT)
        assert agent.stop() == 0, agent.output()
    reader.wait_contents({str(log): [old, new]})
    assert len(reader.records) == 2
    for fid, recs in reader.records.items():
        offsets = [o for o, _ in recs]
        assert len(offsets) == len(set(offsets)), f"{fid}: a (file id, offset) arrived twice"
    assert m["keplerlog_agent_truncations_total"] == 1
    assert m["keplerlog_agent_lost_bytes_total"] == 0


@pytest.mark.kafka
@pytest.mark.parametrize("away", ["stopped", "closed for idleness"])
def test_rewrite_with_the_same_first_bytes_while_not_followed(tmp_path, kafka, topic, logdir, reader, away):
    """The same rewrite while the agent was stopped (its state file is all it remembers), or while
    the file was closed for idleness: resumed by fingerprint alone, the new lines past the old
    offset were shipped as the old file's continuation and the rest never. The mark of the bytes
    before the saved offset tells the rewrite."""
    old, new = BANNER + lines("old", 20), BANNER + lines("new", 60)
    log = logdir / "app.log"
    append(log, old)
    port = free_port()
    cfg = write_config(
        tmp_path,
        kafka.bootstrap,
        topic,
        [str(logdir / "*.log")],
        metrics={"port": port},
        limits={"close_idle_s": 1},
    )
    state = tmp_path / "state" / "agent-state.json"
    agent = AgentProcess(cfg, tmp_path / "agent.out").start()
    try:
        reader.wait_contents({str(log): [old]})
        if away == "stopped":
            assert agent.stop() == 0, agent.output()
        else:
            deadline = time.monotonic() + 15
            while metrics(port)["keplerlog_agent_files_closed_known"] != 1:
                assert time.monotonic() < deadline, "the idle file was never closed"
                time.sleep(0.2)
            assert metrics(port)["keplerlog_agent_files_open"] == 0
        # the fault is real: what the agent remembers is the old file at its end, with its mark
        saved = json.loads(state.read_text())["files"]
        assert [(s["offset"], s["tail_len"]) for s in saved.values()] == [(len(old), 256)]
        if away == "stopped":
            _rewrite(log, new)
            agent = AgentProcess(cfg, tmp_path / "agent2.out").start()
        else:  # complete before the agent looks again (it would see the size drop to 0 otherwise)
            agent.signal(signal.SIGSTOP)
            _rewrite(log, new)
            agent.signal(signal.SIGCONT)
        reader.wait_contents({str(log): [old, new]})
        time.sleep(1.5)  # anything shipped twice would show up by now
        reader.poll()
    finally:
        assert agent.stop() == 0, agent.output()
    reader.wait_contents({str(log): [old, new]})
    assert len(reader.records) == 2  # the old id, ended; the rewrite under a new one
    for fid, recs in reader.records.items():
        offsets = [o for o, _ in recs]
        assert len(offsets) == len(set(offsets)), f"{fid}: a (file id, offset) arrived twice"
    assert "truncated since it was last read" in agent.output(), agent.output()

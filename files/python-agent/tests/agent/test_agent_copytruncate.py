"""copytruncate: what the agent had not read (or not seen acknowledged) is finished from the copy."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
from agent_support import AgentProcess, TopicReader, append, lines, write_config

from keplerlog.agent.config import parse
from keplerlog.agent.identity import Fingerprint
from keplerlog.agent.main import Agent
from keplerlog.agent.sender import Outcome
from keplerlog.agent.tailer import find_rotated_copy, is_rotated_name

LOGROTATE = "/usr/sbin/logrotate"

# -- the copy-matching rule (no broker) ------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "ok"),
    [
        ("portal.log.1", True),
        ("portal.log.0", True),
        ("portal.log-20261124", True),
        ("portal.log.2026-11-24", True),
        ("portal.log_old", True),
        ("portal.log.1.gz", False),
        ("portal.log-20261124.zst", False),
        ("portal.log.2.bz2", False),
        ("portal.log.3.xz", False),
        ("portal.log.4.lz4", False),
        ("portal.log", False),
        ("portal.log.", False),
        ("portal.logx", False),
        ("portal.log1", False),
        ("other.log.1", False),
        ("xportal.log.1", False),
    ],
)
def test_rotated_copy_names(candidate, ok):
    assert is_rotated_name("portal.log", candidate) is ok


def _fp(data: bytes, tmp_path: Path) -> Fingerprint:
    p = tmp_path / "fp.tmp"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        return Fingerprint.of_fd(fd)
    finally:
        os.close(fd)
        p.unlink()


def test_find_rotated_copy_by_name_fingerprint_and_size(tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    content = lines("old", 100)  # > FINGERPRINT_BYTES
    fp = _fp(content[:2000], tmp_path)
    log = d / "portal.log"
    log.write_bytes(b"new\n")  # truncated and rewritten
    (d / "portal.log.2.gz").write_bytes(content)  # compressed suffix: never a candidate
    (d / "portal.log.3").write_bytes(lines("older", 100))  # other first bytes
    (d / "portal.logx").write_bytes(content)  # no separator
    (d / "other.log.1").write_bytes(content)
    assert find_rotated_copy(str(log), fp, 10) is None
    (d / "portal.log-20261124").write_bytes(content)
    found = find_rotated_copy(str(log), fp, 3000)
    assert found is not None
    path, fd, st = found
    try:
        assert path == str(d / "portal.log-20261124") and st.st_size == len(content)
        assert os.pread(fd, 10, 3000) == content[3000:3010]
    finally:
        os.close(fd)
    assert find_rotated_copy(str(log), fp, len(content) + 1) is None  # too short
    assert find_rotated_copy(str(log), fp, 10, frozenset({(st.st_dev, st.st_ino)})) is None  # followed
    # A short fingerprint (the agent had read little) still identifies the copy.
    found = find_rotated_copy(str(log), _fp(content[:70], tmp_path), 70)
    assert found is not None and found[0] == str(d / "portal.log-20261124")
    os.close(found[1])
    os.symlink(d / "portal.log-20261124", d / "portal.log.1")  # symlinks are not followed
    time.sleep(0.01)
    found = find_rotated_copy(str(log), fp, 10)
    assert found is not None and found[0] == str(d / "portal.log-20261124")
    os.close(found[1])


# -- the agent in process, with a fake producer -----------------------------------------------


class FakeSender:
    """Stands in for Sender: records what is sent; the test decides each record's outcome."""

    connected = True
    broken = False

    def __init__(self) -> None:
        self.results: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        self.sent: list[tuple[bytes, object]] = []

    def send(self, value, key, headers, token) -> None:
        self.sent.append((value, token))

    def complete(self, *, fail=lambda token: False) -> None:
        for _, token in self.sent:
            self.results.put(Outcome(token, RuntimeError("boom") if fail(token) else None))
        self.sent.clear()


def _merge(records: dict[int, bytes]) -> bytes:
    """A file's bytes from its records by offset: no gap; replays must equal what they replay."""
    out = bytearray()
    for offset, value in sorted(records.items()):
        assert offset <= len(out), f"gap at {len(out)}"
        assert out[offset : offset + len(value)] == value[: len(out) - offset], "a replay differs"
        out += value[len(out) - offset :]
    return bytes(out)


def test_unread_and_failed_bytes_of_a_truncated_file_come_from_the_copy(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "portal.log"
    first = lines("first", 50)
    append(log, first)
    cfg = parse(
        {
            "service": "shop",
            "kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "t", "max_record_bytes": 1024},
            "state_file": str(tmp_path / "state" / "s.json"),
            "inputs": [{"paths": [str(logs / "*.log")]}],
            "limits": {"max_line_bytes": 1024, "close_inactive_s": 0},
        },
        env={},
    )
    agent = Agent(cfg, use_inotify=False)
    fake = FakeSender()
    agent.sender = fake
    got: dict[str, dict[int, bytes]] = defaultdict(dict)

    def ship(fail=lambda token: False) -> None:
        for value, token in fake.sent:
            if not fail(token):
                stream, offset = token[1], token[2]
                assert got[stream.file_id].setdefault(offset, value) == value, "a replay differs"
        fake.complete(fail=fail)
        agent.ledger.results()

    try:
        agent.fileset.scan(time.monotonic())
        agent.reader.read_all(time.time(), time.monotonic())
        (old_id,) = {t[1].file_id for _, t in fake.sent}
        # The first records are still in flight when the file is copied and truncated, with
        # lines the agent has not read yet.
        unread = lines("unread", 30)
        append(log, unread)
        shutil.copyfile(log, logs / "portal.log.1")
        os.truncate(log, 0)
        second = lines("second", 5)
        append(log, second)
        agent.reader.read_all(time.time(), time.monotonic())
        agent.reader.read_all(time.time(), time.monotonic())
        # Every record of the first identity sent before the truncation fails: re-read from the copy.
        ship(fail=lambda token: token[1].file_id == old_id and token[2] < len(first))
        for _ in range(3):
            agent.reader.read_all(time.time(), time.monotonic())
            ship()
        assert agent.counters.lost_bytes == 0
        assert agent.counters.truncations == 1
        contents = {fid: _merge(recs) for fid, recs in got.items()}
        assert contents[old_id] == first + unread
        (new_id,) = set(contents) - {old_id}
        assert contents[new_id] == second
        # The copy is closed once read, quiet and acknowledged; the state then holds one file.
        agent.fileset.finish_detached(time.monotonic() + 1)
        assert [f.path for f in agent.files.values()] == [str(log)]
    finally:
        for f in agent.files.values():
            f.close()
        agent.watcher.close()
        agent.waker.close()


def test_a_second_copy_seen_by_a_scan_first_is_known_while_the_first_copy_is_followed(tmp_path):
    """Two copytruncates in a row with a glob that matches the copies (`portal.log*`).

    The first copy is still followed (split off under the old id, `close_inactive_s` not over)
    with the live file's path, when the second copy appears and a scan sees it before the
    truncation is noticed. It must be recognised by the live file's first bytes, not checked
    against the first copy's (CI, 2026-12-07: it was shipped again from 0 under a new id).
    """
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "portal.log"
    cfg = parse(
        {
            "service": "shop",
            "kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "t", "max_record_bytes": 4096},
            "state_file": str(tmp_path / "state" / "s.json"),
            "inputs": [{"paths": [str(logs / "portal.log*")]}],
            "limits": {"close_inactive_s": 300},
        },
        env={},
    )
    agent = Agent(cfg, use_inotify=False)
    fake = FakeSender()
    agent.sender = fake
    got: dict[str, dict[int, bytes]] = defaultdict(dict)

    def read_and_ship() -> None:
        for _ in range(3):
            agent.reader.read_all(time.time(), time.monotonic())
            for value, token in fake.sent:
                got[token[1].file_id].setdefault(token[2], value)
            fake.complete()
            agent.ledger.results()

    read0, unread0, read1, unread1 = (lines(p, 100) for p in ("read0", "unread0", "read1", "unread1"))
    try:
        append(log, read0)
        agent.fileset.scan(time.monotonic())
        read_and_ship()
        append(log, unread0)
        shutil.copyfile(log, logs / "portal.log.1")
        os.truncate(log, 0)
        read_and_ship()
        append(log, read1)
        read_and_ship()
        first_copy = os.stat(logs / "portal.log.1")
        followed = {(f.path, f.detached) for f in agent.files.values()}
        assert followed == {(str(log), False), (str(log), True)}, "the first copy is still followed"
        # logrotate: .1 -> .2, the live file copied to .1, then truncated
        os.rename(logs / "portal.log.1", logs / "portal.log.2")
        append(log, unread1)
        shutil.copyfile(log, logs / "portal.log.1")
        os.truncate(log, 0)
        second_copy = os.stat(logs / "portal.log.1")
        assert (second_copy.st_dev, second_copy.st_ino) != (first_copy.st_dev, first_copy.st_ino)
        agent.fileset.scan(time.monotonic())  # the scan sees the new copy before any read
        assert (second_copy.st_dev, second_copy.st_ino) in agent.fileset.copies
        read_and_ship()
        contents = sorted(_merge(recs) for recs in got.values())
        assert contents == sorted([read0 + unread0, read1 + unread1])
        assert agent.counters.truncations == 2
        assert agent.counters.lost_bytes == 0
    finally:
        for f in agent.files.values():
            f.close()
        agent.watcher.close()
        agent.waker.close()


def test_truncation_without_a_copy_counts_the_unread_bytes_lost(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "portal.log"
    append(log, lines("first", 10))
    cfg = parse(
        {
            "service": "shop",
            "kafka": {"bootstrap_servers": "127.0.0.1:1", "topic": "t"},
            "state_file": str(tmp_path / "state" / "s.json"),
            "inputs": [{"paths": [str(logs / "*.log")]}],
        },
        env={},
    )
    agent = Agent(cfg, use_inotify=False)
    agent.sender = FakeSender()
    try:
        agent.fileset.scan(time.monotonic())
        agent.reader.read_all(time.time(), time.monotonic())
        (f,) = agent.files.values()
        append(log, lines("unread", 10))
        f.refresh(time.monotonic())  # the agent saw the size, but did not read yet
        os.truncate(log, 0)
        agent.reader.read_all(time.time(), time.monotonic())
        assert agent.counters.truncations == 1
        assert agent.counters.lost_bytes == len(lines("unread", 10))
    finally:
        for f in agent.files.values():
            f.close()
        agent.watcher.close()
        agent.waker.close()


# -- real Kafka --------------------------------------------------------------------------------


def _no_duplicates(reader: TopicReader) -> None:
    for fid, recs in reader.records.items():
        offsets = [o for o, _ in recs]
        assert len(offsets) == len(set(offsets)), f"{fid}: a (file id, offset) arrived twice"


@pytest.mark.kafka
def test_copytruncate_ships_lines_the_agent_had_not_read_yet(tmp_path, kafka, topic, logdir, reader):
    log = logdir / "portal.log"
    first = lines("first", 300)
    append(log, first)
    cfg = write_config(tmp_path, kafka.bootstrap, topic, [str(logdir / "*.log")])
    agent = AgentProcess(cfg, tmp_path / "agent.out").start()
    try:
        reader.wait_contents({str(log): [first]})
        # The agent is not scheduled: the lines written now are not read before the rotation.
        agent.signal(signal.SIGSTOP)
        unread = lines("unread", 200)
        append(log, unread)
        shutil.copyfile(log, logdir / "portal.log.1")  # what copytruncate does
        os.truncate(log, 0)
        second = lines("second", 50)
        append(log, second)
        agent.signal(signal.SIGCONT)
        copy = (logdir / "portal.log.1").read_bytes()
        assert copy == first + unread
        reader.wait_contents({str(log): [copy, second]})
        time.sleep(0.5)
        reader.poll()
    finally:
        agent.signal(signal.SIGCONT)
        assert agent.stop() == 0, agent.output()
    reader.wait_contents({str(log): [copy, second]})
    _no_duplicates(reader)
    assert len(reader.records) == 2
    assert "reading the rest of" in agent.output()
    assert "were truncated before they were read" not in agent.output()


@pytest.mark.kafka
@pytest.mark.parametrize("pattern", ["*.log", "portal.log*"])
def test_real_logrotate_copytruncate_with_delaycompress(tmp_path, kafka, topic, logdir, reader, pattern):
    """Real logrotate; with `portal.log*` the glob also matches the copies and the .gz files:
    they are recognised (by name and first bytes, by identity once finished) and never shipped
    again, not even after a restart."""
    log = logdir / "portal.log"
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{log} {{\n  copytruncate\n  rotate 5\n  compress\n  delaycompress\n  missingok\n}}\n")
    os.chmod(conf, 0o644)

    def logrotate() -> None:
        subprocess.run(
            [LOGROTATE, "-f", "-s", str(tmp_path / "logrotate.state"), str(conf)],
            check=True,
            capture_output=True,
        )

    cfg = write_config(tmp_path, kafka.bootstrap, topic, [str(logdir / pattern)])
    agent = AgentProcess(cfg, tmp_path / "agent.out").start()
    expected: list[bytes] = []
    try:
        for rnd in range(2):
            read = lines(f"read{rnd}", 300)
            append(log, read)
            reader.wait_for(lambda read=read: any(read in c for c in reader.by_path().get(str(log), [])))
            agent.signal(signal.SIGSTOP)
            append(log, lines(f"unread{rnd}", 300))
            logrotate()
            expected.append((logdir / "portal.log.1").read_bytes())
            agent.signal(signal.SIGCONT)
            reader.wait_contents({str(log): expected})
        assert (logdir / "portal.log.2.gz").exists()  # the first copy, compressed by the second run
        last = lines("after", 40)
        append(log, last)
        reader.wait_contents({str(log): [*expected, last]})
    finally:
        agent.signal(signal.SIGCONT)
        assert agent.stop() == 0, agent.output()
    _no_duplicates(reader)
    assert agent.output().count("reading the rest of") == 2
    assert "were truncated before they were read" not in agent.output()
    assert set(reader.paths.values()) == {str(log)}, "a rotated copy was shipped as a file of its own"
    # a restart ships nothing again: the finished copies are in the state file by identity
    shipped = len(reader.batches)
    agent = AgentProcess(cfg, tmp_path / "agent2.out").start()
    try:
        time.sleep(3)  # several rescans
        reader.poll(timeout_ms=1000)
    finally:
        assert agent.stop() == 0, agent.output()
    assert len(reader.batches) == shipped, [b.path for b, _ in reader.batches[shipped:]]


@pytest.mark.kafka
@pytest.mark.parametrize("copy_kept", [True, False])
def test_copytruncate_while_the_agent_is_down(tmp_path, kafka, topic, logdir, reader, copy_kept):
    """The agent dies with unread lines; copytruncate runs before it is back. Its rest is read
    from the copy under the old id; without a copy that is said, not silently skipped."""
    log = logdir / "portal.log"
    first = lines("first", 300)
    append(log, first)
    cfg = write_config(tmp_path, kafka.bootstrap, topic, [str(logdir / "*.log")])
    agent = AgentProcess(cfg, tmp_path / "agent.out").start()
    reader.wait_contents({str(log): [first]})
    state = tmp_path / "state" / "agent-state.json"
    deadline = time.monotonic() + 10
    while not (state.exists() and f'"offset":{len(first)}' in state.read_text()):
        assert time.monotonic() < deadline, "the checkpoint never held the acknowledged lines"
        time.sleep(0.1)
    agent.signal(signal.SIGSTOP)
    unread = lines("unread", 200)
    append(log, unread)  # written after the agent's last read: it dies before reading it
    agent.signal(signal.SIGKILL)
    agent.wait()
    shutil.copyfile(log, logdir / "portal.log.1")
    os.truncate(log, 0)
    if not copy_kept:
        os.unlink(logdir / "portal.log.1")  # e.g. compressed at once, no delaycompress
    second = lines("second", 50)
    append(log, second)
    agent = AgentProcess(cfg, tmp_path / "agent2.out").start()
    try:
        reader.wait_contents({str(log): [first + unread if copy_kept else first, second]})
        time.sleep(1)
        reader.poll()
    finally:
        assert agent.stop() == 0, agent.output()
    _no_duplicates(reader)
    out = agent.output()
    if copy_kept:
        assert "truncated while not followed; reading the rest of" in out, out
    else:
        assert "no rotated copy holds its rest" in out, out
    assert len(reader.records) == 2  # the old id (continued) and the new one

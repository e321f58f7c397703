"""Watermarks: each file's account (first, seen, acked, state, lost) for the consumer's audit.

The unit tests drive the agent's parts with a fake producer and a chosen clock; the Kafka tests
run the agent as a process and read the topic back: a watermark must follow every record it
accounts for on the same partition, and claim as lost exactly the bytes the agent saw and could
not ship (no more: what it never saw it cannot know).
"""

from __future__ import annotations

import calendar
import contextlib
import io
import itertools
import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from agent_support import (
    AgentProcess,
    FakeSender,
    LiveWriter,
    append,
    first_pass,
    in_process,
    lines,
    metrics,
    write_config,
)
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition

from keplerlog.agent import checkpoint
from keplerlog.agent.config import ConfigError, WatermarkConfig, load, parse
from keplerlog.agent.main import Agent
from keplerlog.agent.metrics import AgentMetrics, Counters, Snapshot
from keplerlog.agent.watermarks import Book, unknown_file_id
from keplerlog.audit.main import main as audit_main
from keplerlog.consumer.app import ConsumerApp
from keplerlog.record import Watermark, is_watermark
from keplerlog.testing.consumer import consumer_config
from keplerlog.testing.kafka_node import free_port

BASE = {"service": "shop", "state_file": "/var/lib/k/s.json", "inputs": [{"paths": ["/app/logs/*.log"]}]}


def _close(agent: Agent) -> None:
    for f in agent.files.values():
        f.close()
    agent.watcher.close()
    agent.waker.close()


def _shipped(sender: FakeSender) -> int:
    return sum(len(v) for v, _ in sender.sent)


def _marks(sender: FakeSender, file_id: str) -> list[Watermark]:
    return [m for m in sender.marks if m.file_id == file_id]


def _consume_watermarks(tmp_path, kafka, topic, marks: int, **config) -> Path:
    """Run a consumer (`config` overrides) over the topic until it reconciled `marks`
    watermarks; its data root."""
    root = tmp_path / "central"
    app = ConsumerApp(consumer_config(kafka.bootstrap, topic, root, **config))
    thread = threading.Thread(target=app.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        counts = app.metrics.counts
        while counts["watermarks"] + counts["watermarks_replayed"] < marks:
            assert time.monotonic() < deadline, dict(counts)
            time.sleep(0.2)
    finally:
        app.stop()
        thread.join(30)
    assert app.metrics.counts["quarantined"] == 0
    return root


def _audit(root: Path, day: str) -> tuple[int, dict]:
    """keplerlog-audit of `day` under `root`: (exit code, its JSON document)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = audit_main(["--root", str(root), "--day", day, "--json", "--threshold", "0.0001"])
    return code, json.loads(out.getvalue())


def _day(ts_ms: int) -> str:
    return time.strftime("%Y%m%d", time.gmtime(ts_ms / 1000))  # the consumer's zone: UTC


def _audit_through_a_consumer(tmp_path, kafka, topic, reader, ts_ms: int) -> tuple[int, dict]:
    """Run a consumer over the topic until it reconciled every watermark the reader saw, then
    keplerlog-audit of the day of `ts_ms`: (exit code, the day's totals)."""
    root = _consume_watermarks(tmp_path, kafka, topic, len(reader.marks))
    code, body = _audit(root, _day(ts_ms))
    return code, body["total"]


# -- configuration ---------------------------------------------------------------------------


def test_watermark_settings_default_and_zero_switches_them_off():
    cfg = parse(BASE, env={})
    assert cfg.watermarks == WatermarkConfig(interval_s=60.0, refresh_s=3600.0) and cfg.watermarks.enabled
    off = parse({**BASE, "watermarks": {"interval_s": 0}}, env={})
    assert not off.watermarks.enabled
    assert parse(
        {**BASE, "watermarks": {"interval_s": 0.5, "refresh_s": 2}}, env={}
    ).watermarks == WatermarkConfig(0.5, 2.0)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"interval_s": -1}, "watermarks.interval_s: must be >= 0"),
        ({"interval_s": "often"}, "watermarks.interval_s: expected a number"),
        ({"interval_s": 0.01}, "watermarks.interval_s: must be 0 (off) or >= 0.1"),
        ({"interval_s": 100_000}, "watermarks.interval_s: must be at most 86400"),
        ({"interval_s": math.nan}, "watermarks.interval_s: must be at most 86400"),
        ({"refresh_s": 0}, "watermarks.refresh_s: must be >= 0.1"),
        (
            {"interval_s": 60, "refresh_s": 30},
            "watermarks.refresh_s (30.0) must be at least watermarks.interval_s",
        ),
        ({"every": 5}, "watermarks: unknown key(s) every"),
        ([60], "watermarks: expected a mapping"),
    ],
)
def test_bad_watermark_settings_are_one_line_errors(section, message):
    with pytest.raises(ConfigError) as err:
        parse({**BASE, "watermarks": section}, env={})
    assert message in str(err.value) and "\n" not in str(err.value)


# -- the book --------------------------------------------------------------------------------


def test_the_book_counts_each_lost_byte_once_and_keeps_nothing_when_off():
    book = Book(enabled=True)
    assert book.lose("f", 10, 20, "truncated") == 10
    assert book.lose("f", 15, 30, "truncated") == 10  # 15..20 was recorded already
    assert book.lose("f", 5, 5, "deleted") == 0
    assert book.lost["f"] == ((10, 20, "truncated"), (15, 30, "truncated"))
    book.forget("f")
    assert not book.lost
    off = Book(enabled=False)
    assert off.lose("f", 0, 7, "deleted") == 7  # still counted in lost_bytes by the caller
    off.note((1, 2))
    assert not off.lost and not off.due and not off.ended


def test_watermark_counters_are_exported_like_the_others():
    counters = Counters(watermarks_sent=3, watermarks_failed=1)
    page = AgentMetrics(counters, lambda: Snapshot("shop", [], {}, {})).render().decode()
    assert "keplerlog_agent_watermarks_sent_total 3.0" in page
    assert "keplerlog_agent_watermarks_failed_total 1.0" in page


# -- the state file keeps where shipping began and what was seen -------------------------------


def test_the_state_file_keeps_first_and_seen_and_reads_older_ones(tmp_path):
    path = tmp_path / "s.json"
    st = checkpoint.FileState("id1", "/l/a.log", 1, 2, 10, "abc", 1234, first=100, seen=5000)
    checkpoint.save(path, [st])
    (back,) = checkpoint.load(path).values()
    assert (back.first, back.seen, back.offset) == (100, 5000, 1234)
    # a state written before watermarks: nothing seen beyond the offset is known
    doc = json.loads(path.read_text())
    for key in ("first", "seen"):
        del doc["files"]["id1"][key]
    path.write_text(json.dumps(doc))
    (old,) = checkpoint.load(path).values()
    assert (old.first, old.seen) == (0, 1234)
    (old_end,) = checkpoint.load(path, first_unknown_at_offset=True).values()
    assert old_end.first == 1234  # start_at end: where it began is unknown, claim no more


def test_a_checkpoint_reuses_the_state_of_a_file_that_did_not_change(tmp_path, logdir):
    """state_of builds a file's state again only when it changed (its acknowledged offset, its
    size seen): an idle file's state is the same object, so it compares and encodes by identity."""
    log = logdir / "a.log"
    append(log, lines("a", 10))
    agent, sender = in_process(tmp_path, logdir, auto_ack=True)
    try:
        first_pass(agent, sender)
        (f,) = agent.files.values()
        first = checkpoint.state_of(f)
        assert checkpoint.state_of(f) is first and first.offset == log.stat().st_size
        append(log, lines("b", 1))
        f.refresh(time.monotonic())
        grown = checkpoint.state_of(f)  # seen moved, the offset not yet
        assert grown is not first and (grown.offset, grown.seen) == (first.offset, log.stat().st_size)
        agent.reader.dirty.add(str(log))
        agent.reader.read_all(time.time(), time.monotonic())
        agent.ledger.results()
        acked = checkpoint.state_of(f)
        assert acked is not grown and acked.offset == log.stat().st_size
        assert acked.mark != first.mark and acked.mark.end == acked.offset  # the mark moved with it
        assert checkpoint.state_of(f) is acked
    finally:
        _close(agent)


def test_start_at_end_is_the_first_byte_across_a_restart(tmp_path, logdir):
    log = logdir / "a.log"
    before = lines("before", 20)
    append(log, before)

    def agent() -> tuple[Agent, FakeSender]:
        cfg = write_config(tmp_path, "127.0.0.1:1", "t", [str(logdir / "*.log")], start_at="end")
        a = Agent(load(str(cfg)))
        s = FakeSender(a.waker.wake, auto_ack=True)
        a.sender = s  # type: ignore[assignment]
        s.connect()
        return a, s

    a, s = agent()
    try:
        a.fileset.scan(time.monotonic())
        append(log, lines("after", 5))
        a.reader.read_all(time.time(), time.monotonic())
        a.ledger.results()
        a.watermarks.final()
        a.ledger.checkpoint(a.fileset.closed, final=True)
    finally:
        _close(a)
    (mark,) = s.marks
    assert (mark.first, mark.acked, mark.seen) == (len(before), log.stat().st_size, log.stat().st_size)
    a, s = agent()  # a restart: the file resumes, and where shipping began is still known
    try:
        a.fileset.scan(time.monotonic())
        a.watermarks.final()
    finally:
        _close(a)
    assert [(m.first, m.acked) for m in s.marks] == [(len(before), log.stat().st_size)]


class _SlowKafka(FakeSender):
    """A Kafka that takes ACK_S to acknowledge a watermark: a flush given less gets no ack."""

    ACK_S = 2.5

    def __init__(self, wake) -> None:
        super().__init__(wake, auto_ack=False)
        self.delivered: list[Watermark] = []

    def flush(self, timeout: float) -> bool:
        if timeout < self.ACK_S:
            time.sleep(timeout)
            return False
        time.sleep(self.ACK_S)
        self.delivered.extend(self.marks[len(self.marks) - len(self.mark_tokens) :])
        self.ack_marks()
        return True


@pytest.mark.parametrize("budget_s", [5, 1])
def test_the_last_watermark_waits_for_its_ack_within_the_shutdown_budget(tmp_path, logdir, budget_s):
    """A slow Kafka (2.5 s per ack) at shutdown. With a 5 s shutdown budget the last watermark
    is acknowledged: it may wait for what is left of the budget (it had one fixed second). With
    a 1 s budget, shorter than the ack, it is not, and the agent still stops on time."""
    log = logdir / "a.log"
    data = lines("a", 100)
    append(log, data)
    agent, _ = in_process(
        tmp_path,
        logdir,
        auto_ack=False,
        watermarks={"interval_s": 0.2, "refresh_s": 60},
        shutdown_timeout_s=budget_s,
    )
    sender = _SlowKafka(agent.waker.wake)
    agent.sender = sender  # type: ignore[assignment]
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(sender.sent) != 1:
            assert time.monotonic() < deadline, "the agent sent nothing"
            time.sleep(0.02)
        sender.ack(0)
        while not any(m.acked == len(data) for m in sender.marks):
            assert time.monotonic() < deadline, "no watermark claims the acknowledged bytes"
            sender.ack_marks()
            time.sleep(0.02)
        sender.ack_marks()
        before = len(sender.marks)
        stop_ms = time.time_ns() // 1_000_000
        t0 = time.monotonic()
    finally:
        agent.request_stop()
        thread.join(15)
    took = time.monotonic() - t0
    assert not thread.is_alive()
    last = sender.marks[-1]
    assert len(sender.marks) == before + 1 and last.ts_ms >= stop_ms  # the stop's own mark was sent
    assert (last.acked, last.seen) == (len(data), len(data))
    if budget_s > _SlowKafka.ACK_S:
        assert sender.delivered == [last], "the last watermark was not acknowledged before the agent stopped"
    else:  # past the budget: given up, not waited for
        assert sender.delivered == [] and took < _SlowKafka.ACK_S, took


# -- what a watermark claims, and when -------------------------------------------------------


def test_acked_is_claimed_only_once_kafka_acknowledged_and_an_unchanged_file_waits_for_refresh(
    tmp_path, logdir
):
    log = logdir / "a.log"
    data = lines("a", 2000)  # 120 KB: two records of at most 64 KiB
    append(log, data)
    agent, sender = in_process(
        tmp_path, logdir, auto_ack=False, watermarks={"interval_s": 1, "refresh_s": 10}
    )
    wm = agent.watermarks
    try:
        sender.connect()
        agent.fileset.scan(time.monotonic())
        agent.reader.read_all(time.time(), time.monotonic())
        assert _shipped(sender) == len(data) and len(sender.sent) == 2
        t = wm.next_pass
        wm.step(t)
        (mark,) = sender.marks
        assert (mark.first, mark.acked, mark.seen, mark.state, mark.lost) == (0, 0, len(data), "open", ())
        sender.ack(1)  # out of order: nothing is contiguous from 0 yet
        sender.ack_marks()
        agent.ledger.results()
        wm.step(t := t + 1)
        assert len(sender.marks) == 1, "an ack beyond a gap moved nothing: no news"
        sender.ack(0)
        agent.ledger.results()
        wm.step(t := t + 1)
        assert sender.marks[-1].acked == len(data) and len(sender.marks) == 2
        sender.ack_marks()
        agent.ledger.results()
        for _ in range(9):  # unchanged: nothing until refresh_s (10 s) after the last one
            wm.step(t := t + 1)
        assert len(sender.marks) == 2
        wm.step(t := t + 1)
        assert len(sender.marks) == 3
        assert replace(sender.marks[-1], ts_ms=0) == replace(sender.marks[-2], ts_ms=0)
    finally:
        _close(agent)
    c = agent.counters
    assert c.watermarks_sent == 3 and c.watermarks_failed == 0
    # watermarks are not data: the record counters count the file's records only
    assert (c.records_sent, c.lines_sent, c.bytes_sent) == (2, 2000, len(data))
    assert (c.records_acked, c.lines_acked, c.bytes_acked) == (2, 2000, len(data))


def test_a_failed_watermark_is_counted_and_sent_again_at_the_next_interval(tmp_path, logdir):
    for name in ("a.log", "b.log"):
        append(logdir / name, lines(name, 10))
    agent, sender = in_process(
        tmp_path, logdir, auto_ack=False, watermarks={"interval_s": 5, "refresh_s": 60}
    )
    wm = agent.watermarks
    try:
        sender.connect()
        agent.fileset.scan(time.monotonic())
        t = wm.next_pass
        wm.step(t)
        assert len(sender.marks) == 2
        sender.ack_marks(RuntimeError("boom"))  # both fail on the way
        agent.ledger.results()
        assert agent.counters.watermarks_failed == 2
        agent.watermarks.book.note(next(iter(agent.files)))  # news before the interval...
        wm.step(t + 1)
        assert len(sender.marks) == 2  # ...do not re-send a failed one at once
        wm.step(t + 5)
        assert len(sender.marks) == 4
        sender.ack_marks()
        agent.ledger.results()
        # a send that raises (the producer's buffer full): counted, the pass stops, and nothing
        # is tried again before the next interval
        real = sender.send

        def refuse(value, key, headers, token):
            if is_watermark(headers):
                raise RuntimeError("buffer full")
            real(value, key, headers, token)

        sender.send = refuse  # type: ignore[method-assign]
        wm.step(t + 5 + 60)  # refresh due for both
        assert agent.counters.watermarks_failed == 3  # one try, not one per file
        sender.send = real  # type: ignore[method-assign]
        agent.watermarks.book.note(next(iter(agent.files)))
        wm.step(t + 5 + 61)
        assert len(sender.marks) == 4
        wm.step(t + 5 + 65)
        assert len(sender.marks) == 6
    finally:
        _close(agent)
    assert agent.counters.watermarks_sent == 6


def test_truncation_with_unread_bytes_ends_the_old_id_gone_after_its_last_outcomes(tmp_path, logdir):
    """The old id's held partial line is sent after the truncation and fails (no copy to re-read
    it from): its watermark waits for that outcome and lists both ranges, each counted once."""
    log = logdir / "portal.log"
    first, partial, unread = lines("first", 10), b"a partial line", lines("unread", 10)
    append(log, first + partial)
    agent, sender = in_process(tmp_path, logdir, auto_ack=False, watermarks={"interval_s": 60})
    wm = agent.watermarks
    try:
        sender.connect()
        agent.fileset.scan(time.monotonic())
        agent.reader.read_all(time.time(), time.monotonic())
        (f,) = agent.files.values()
        old = f.stream.file_id
        assert _shipped(sender) == len(first)  # the partial line is held
        sender.ack(0)
        agent.ledger.results()
        append(log, unread)
        f.refresh(time.monotonic())  # the agent saw the size, but did not read yet
        os.truncate(log, 0)
        agent.reader.read_all(time.time(), time.monotonic())
        assert agent.counters.truncations == 1 and len(sender.sent) == 2  # the held bytes, old id
        wm.step(time.monotonic())
        assert not _marks(sender, old), "the old id's account waits for its record in flight"
        sender.ack(1, RuntimeError("refused"))
        agent.ledger.results()
        wm.step(time.monotonic())
    finally:
        _close(agent)
    (mark,) = _marks(sender, old)
    p, u = len(first), len(first) + len(partial)
    assert (mark.state, mark.first, mark.acked, mark.seen) == ("gone", 0, p, u + len(unread))
    assert mark.lost == ((p, u, "truncated"), (u, u + len(unread), "truncated"))
    assert agent.counters.lost_bytes == len(partial) + len(unread)


def test_a_truncated_id_with_nothing_unread_is_finished_and_then_forgotten(tmp_path, logdir):
    log = logdir / "portal.log"
    append(log, lines("first", 10))
    agent, sender = in_process(tmp_path, logdir, auto_ack=True, watermarks={"interval_s": 60})
    wm = agent.watermarks
    try:
        sender.connect()
        agent.fileset.scan(time.monotonic())
        agent.reader.read_all(time.time(), time.monotonic())
        agent.ledger.results()
        old = next(iter(agent.files.values())).stream.file_id
        os.truncate(log, 0)
        append(log, b"new\n")
        agent.reader.sweep = True  # as inotify's write event would: look at the file
        agent.reader.read_all(time.time(), time.monotonic())
        agent.ledger.results()
        wm.step(time.monotonic())
        agent.ledger.results()  # the watermark's ack: the old id is forgotten
        wm.step(wm.next_pass)
    finally:
        _close(agent)
    (mark,) = _marks(sender, old)
    assert (mark.state, mark.acked, mark.seen, mark.lost) == (
        "finished",
        len(lines("first", 10)),
        mark.acked,
        (),
    )
    assert old not in wm.said and old not in wm.book.lost and old not in wm.book.ended
    assert agent.counters.lost_bytes == 0


@pytest.mark.parametrize("fate", ["deleted", "rotated"])
def test_a_file_waiting_for_a_slot_that_leaves_before_it_is_opened(tmp_path, logdir, fate):
    a, b = logdir / "a.log", logdir / "b.log"
    append(a, lines("a", 10))
    append(b, lines("b", 30))
    agent, sender = in_process(
        tmp_path, logdir, auto_ack=True, max_open_files=1, watermarks={"interval_s": 60}
    )
    try:
        sender.connect()
        agent.fileset.scan(time.monotonic())
        assert [f.path for f in agent.files.values()] == [str(a)] and agent.fileset.waiting == 1
        st = b.stat()
        if fate == "deleted":
            b.unlink()
        else:
            b.rename(logdir / "b.old")  # no glob matches it, and it never got a descriptor
        agent.fileset.scan(time.monotonic())
        agent.watermarks.step(time.monotonic())
    finally:
        _close(agent)
    (mark,) = _marks(sender, unknown_file_id((st.st_dev, st.st_ino)))
    assert mark.file_id == f"w:{st.st_dev}:{st.st_ino}"
    assert (mark.path, mark.module, mark.first, mark.acked, mark.seen) == (str(b), "portal", 0, 0, st.st_size)
    assert (mark.state, mark.lost) == ("gone", ((0, st.st_size, fate),))
    assert agent.counters.lost_bytes == st.st_size
    assert not any(token[1].file_id == mark.file_id for _, token in sender.sent)


def test_a_known_file_deleted_while_it_waits_for_a_slot_loses_what_it_grew_by(tmp_path, logdir):
    a, b = logdir / "a.log", logdir / "b.log"
    append(a, lines("a", 10))
    append(b, lines("b", 10))
    agent, sender = in_process(
        tmp_path, logdir, auto_ack=True, close_idle_s=0.5, watermarks={"interval_s": 60}
    )
    try:
        sender.connect()
        mono = time.monotonic()
        agent.fileset.scan(mono)
        agent.reader.read_all(time.time(), mono)
        agent.ledger.results()
        agent.fileset.scan(mono + 1)  # both idle: closed, remembered by identity
        assert len(agent.closed) == 2 and not agent.files
        agent.watermarks.step(mono + 1)
        agent.ledger.results()
        assert sorted(m.state for m in sender.marks) == ["closed", "closed"]
        agent.fileset.open_limit = 1
        before = b.stat().st_size
        append(a, lines("a-more", 5))
        append(b, lines("b-more", 5))  # grows while closed, no slot free: b waits
        agent.fileset.scan(mono + 2)
        assert agent.fileset.waiting == 1 and [f.path for f in agent.files.values()] == [str(a)]
        (state,) = agent.closed.values()
        grown = b.stat().st_size
        b.unlink()
        agent.fileset.scan(mono + 3)
        agent.watermarks.step(mono + 3)
    finally:
        _close(agent)
    mark = _marks(sender, state.file_id)[-1]
    assert (mark.state, mark.acked, mark.seen, mark.lost) == (
        "gone",
        before,
        grown,
        ((before, grown, "deleted"),),
    )
    assert agent.counters.lost_bytes == grown - before


def test_a_file_rotated_away_while_stopped_loses_what_was_seen_not_what_was_written_later(tmp_path, logdir):
    log = logdir / "a.log"
    append(log, lines("a", 2000))  # two records
    agent, sender = in_process(tmp_path, logdir, auto_ack=False)
    try:
        sender.connect()
        agent.fileset.scan(time.monotonic())
        agent.reader.read_all(time.time(), time.monotonic())
        sender.ack(0)  # the second record is never acknowledged: the agent stops with it
        agent.ledger.results()
        (f,) = agent.files.values()
        fid, acked, seen = f.stream.file_id, f.stream.acks.acked, f.size
        agent.ledger.checkpoint(agent.fileset.closed, final=True)
    finally:
        _close(agent)
    assert 0 < acked < seen == log.stat().st_size
    append(log, lines("while-stopped", 100))  # never seen by any agent
    os.rename(log, logdir / "a.log.1")  # no glob matches it...
    (logdir / "a.log.1").unlink()  # ...and it is gone before the agent is back
    agent, sender = in_process(tmp_path, logdir, auto_ack=True, watermarks={"interval_s": 60})
    try:
        sender.connect()
        agent.fileset.scan(time.monotonic())
        agent.watermarks.step(time.monotonic())
    finally:
        _close(agent)
    (mark,) = _marks(sender, fid)
    assert (mark.state, mark.first, mark.acked, mark.seen) == ("gone", 0, acked, seen)
    assert mark.lost == ((acked, seen, "rotated"),)
    assert agent.counters.lost_bytes == seen - acked


def test_a_closed_file_that_goes_away_is_finished_once_and_then_forgotten(tmp_path, logdir):
    log = logdir / "a.log"
    append(log, lines("a", 10))
    agent, sender = in_process(
        tmp_path, logdir, auto_ack=True, close_idle_s=0.5, watermarks={"interval_s": 1, "refresh_s": 2}
    )
    wm = agent.watermarks
    try:
        sender.connect()
        mono = time.monotonic()
        agent.fileset.scan(mono)
        agent.reader.read_all(time.time(), mono)
        agent.ledger.results()
        agent.fileset.scan(mono + 1)  # closed for idleness: said at once, not at the interval
        wm.step(mono + 1)
        assert len(agent.closed) == 1
        assert [m.state for m in sender.marks] == ["closed"]
        agent.ledger.results()
        log.unlink()
        agent.fileset.scan(mono + 2)
        wm.step(mono + 2)
        agent.ledger.results()
        for i in range(10):  # many intervals and refreshes later: never again
            wm.step(mono + 3 + i * 3)
            agent.ledger.results()
    finally:
        _close(agent)
    assert [m.state for m in sender.marks] == ["closed", "finished"]
    assert sender.marks[-1].acked == sender.marks[-1].seen == len(lines("a", 10))
    assert not wm.said and not wm.book.lost and not wm.book.ended and not wm.book.due


def test_a_file_no_longer_followed_keeps_its_module_on_the_data_records_key(tmp_path, logdir):
    # Two inputs whose globs fnmatch would both match for nginx/access.log: glob's `*` stays in
    # one directory, so its data goes under nginx; its watermarks must too (same key, same
    # partition), also once the file is closed and deleted, and after a restart.
    (logdir / "nginx").mkdir()
    log = logdir / "nginx" / "access.log"
    append(log, lines("a", 10))
    cfg = write_config(
        tmp_path,
        "127.0.0.1:1",
        "t",
        [],
        inputs=[
            {"paths": [str(logdir / "*.log")], "module": "sys"},
            {"paths": [str(logdir / "nginx" / "*.log")], "module": "nginx"},
        ],
        limits={"shutdown_timeout_s": 1, "read_coalesce_ms": 0, "close_idle_s": 0.5},
        kafka={"max_record_bytes": 65536},
        watermarks={"interval_s": 1, "refresh_s": 2},
    )
    agent = Agent(load(str(cfg)))
    sender = FakeSender(agent.waker.wake, auto_ack=True)
    agent.sender = sender  # type: ignore[assignment]
    wm = agent.watermarks
    try:
        sender.connect()
        mono = time.monotonic()
        agent.fileset.scan(mono)
        agent.reader.read_all(time.time(), mono)
        agent.ledger.results()
        agent.fileset.scan(mono + 1)  # closed for idleness before any watermark
        wm.step(mono + 1)
        agent.ledger.results()
        assert len(agent.closed) == 1
        assert next(iter(agent.closed.values())).module == "nginx"
        agent.ledger.checkpoint(agent.closed)  # and the state file keeps it for a restart
        (saved,) = checkpoint.load(tmp_path / "state" / "agent-state.json").values()
        assert saved.module == "nginx"
        log.unlink()
        agent.fileset.scan(mono + 2)
        wm.step(mono + 2)
        agent.ledger.results()
    finally:
        _close(agent)
    assert {t[0].inp.module for _, t in sender.sent} == {"nginx"}
    assert [m.state for m in sender.marks] == ["closed", "finished"]
    assert {m.module for m in sender.marks} == {"nginx"}


def test_bookkeeping_stays_small_with_many_files(tmp_path, logdir):
    for i in range(300):
        append(logdir / f"f{i:03d}.log", lines(f"f{i}", 2))
    agent, sender = in_process(
        tmp_path, logdir, auto_ack=True, close_idle_s=0.5, watermarks={"interval_s": 1}
    )
    wm = agent.watermarks
    try:
        sender.connect()
        mono = time.monotonic()
        agent.fileset.scan(mono)
        agent.reader.read_all(time.time(), mono)
        agent.ledger.results()
        wm.step(wm.next_pass)
        assert len(sender.marks) == 300 and len(wm.said) == 300
        agent.ledger.results()
        # a file no part stands for any more, gone without a word (a guard: every way out of
        # the file set ends an id): the next full pass forgets it, it is never sent again
        key, f = next(iter(agent.files.items()))
        del agent.files[key]
        f.close()
        os.unlink(f.path)
        wm.step(wm.next_pass)
        assert len(wm.said) == 299 and f.stream.file_id not in wm.said
        agent.fileset.scan(mono + 1)  # all closed for idleness: said at once
        wm.step(mono + 1)
        agent.ledger.results()
        for p in logdir.iterdir():
            p.unlink()
        agent.fileset.scan(mono + 2)
        wm.step(mono + 2)
        agent.ledger.results()
        wm.step(wm.next_pass + 100)
    finally:
        _close(agent)
    assert not wm.said and not wm.book.lost and not wm.book.ended and not wm.book.due
    assert agent.counters.watermarks_sent == 300 + 2 * 299  # open; closed and finished


def test_shutdown_sends_one_last_watermark_per_followed_file_after_the_last_acks(tmp_path, logdir):
    for name in ("a.log", "b.log"):
        append(logdir / name, lines(name, 50))
    agent, sender = in_process(tmp_path, logdir, auto_ack=True, watermarks={"interval_s": 60})
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        total = sum(p.stat().st_size for p in logdir.iterdir())
        deadline = time.monotonic() + 10
        while agent.counters.bytes_acked < total:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not sender.marks  # the interval (60 s) is far away
    finally:
        agent.request_stop()
        thread.join(10)
    assert sorted((m.path, m.state, m.acked, m.seen) for m in sender.marks) == sorted(
        (str(p), "open", p.stat().st_size, p.stat().st_size) for p in logdir.iterdir()
    )


def test_watermarks_off_send_nothing_but_lost_bytes_are_still_counted(tmp_path, logdir):
    log = logdir / "portal.log"
    append(log, lines("first", 10))
    agent, sender = in_process(
        tmp_path, logdir, auto_ack=True, close_idle_s=0.5, watermarks={"interval_s": 0}
    )
    try:
        sender.connect()
        agent.fileset.scan(time.monotonic())
        agent.reader.read_all(time.time(), time.monotonic())
        (f,) = agent.files.values()
        append(log, lines("unread", 10))
        f.refresh(time.monotonic())
        os.truncate(log, 0)
        agent.reader.dirty.add(str(log))  # inotify named the write
        agent.reader.read_all(time.time(), time.monotonic())
        agent.ledger.results()
        agent.watermarks.step(time.monotonic() + 3600)
        agent.fileset.scan(time.monotonic() + 10)  # closed for idleness
        agent.watermarks.step(time.monotonic() + 7200)
        agent.watermarks.final()
    finally:
        _close(agent)
    assert agent.counters.truncations == 1 and agent.counters.files_closed == 1  # the events happened
    assert agent.counters.lost_bytes == len(lines("unread", 10))
    assert not sender.marks and agent.counters.watermarks_sent == 0
    book = agent.watermarks.book
    assert not book.lost and not book.ended and not book.due


# -- real Kafka ------------------------------------------------------------------------------


def _check_order(reader, file_id: str) -> None:
    """Each watermark of `file_id` is on its records' partition, after the ones holding [first, acked)."""
    records = [
        (o, len(v), where)
        for (o, v), where in zip(reader.records[file_id], reader.where[file_id], strict=True)
    ]
    partitions = {p for _, _, (p, _) in records}
    marks = [(w, p, k) for w, p, k in reader.marks if w.file_id == file_id]
    assert marks, f"no watermark of {file_id}"
    for mark, part, kafka_offset in marks:
        assert partitions <= {part}, "a watermark on another partition than its file's records"
        before = sorted((o, o + n) for o, n, (_, k) in records if k < kafka_offset)
        covered = mark.first
        for start, end in before:
            if start <= covered:
                covered = max(covered, end)
        assert covered >= mark.acked, (
            f"{file_id}: acked {mark.acked} claimed, only {covered} stored before it"
        )


def _ms_before_stop() -> int:
    """Return the wall clock in ms once the clock has moved past it.

    The agent's last watermark, stamped by the stop that follows, is then later (>) however
    fast the agent stops: it once stopped within the same millisecond, and a test waiting for
    a mark later than the stop waited in vain.
    """
    now = time.time_ns() // 1_000_000
    while time.time_ns() // 1_000_000 <= now:
        time.sleep(0.0005)
    return now


def _agent_with_frequent_watermarks(tmp_path, kafka, topic, logdir, **over) -> AgentProcess:
    """The agent following logdir/*.log, a watermark every 0.5 s (a refresh every 3 s), started;
    `over`: more configuration sections."""
    cfg = write_config(
        tmp_path,
        kafka.bootstrap,
        topic,
        [str(logdir / "*.log")],
        watermarks={"interval_s": 0.5, "refresh_s": 3},
        **over,
    )
    return AgentProcess(cfg, tmp_path / "agent.out").start()


@pytest.mark.kafka
def test_a_clean_run(tmp_path, kafka, topic, logdir, reader):
    log = logdir / "portal.log"
    data = lines("clean", 500)
    append(log, data)
    port = free_port()
    agent = _agent_with_frequent_watermarks(tmp_path, kafka, topic, logdir, metrics={"port": port})
    try:
        reader.wait_contents({str(log): [data]})
        (fid,) = reader.records
        reader.wait_for(lambda: any(m.acked == len(data) for m in reader.marks_of(fid)))
        time.sleep(5)  # ten intervals with nothing new: a refresh (3 s), not ten watermarks
        stop_ms = _ms_before_stop()
        m = metrics(port)
    finally:
        assert agent.stop() == 0, agent.output()
    reader.wait_for(lambda: any(w.ts_ms > stop_ms for w in reader.marks_of(fid)))  # the last one
    marks = reader.marks_of(fid)
    last = marks[-1]
    assert (last.first, last.acked, last.seen, last.state, last.lost) == (0, len(data), len(data), "open", ())
    assert (last.service, last.module, last.host, last.path) == ("shop", "portal", "test-host", str(log))
    _check_order(reader, fid)
    full = [w for w in marks if w.acked == len(data) and w.ts_ms <= stop_ms]
    assert 2 <= len(full) <= 3, [w.ts_ms for w in full]
    gaps = [b.ts_ms - a.ts_ms for a, b in itertools.pairwise(full)]
    assert all(g >= 2900 for g in gaps), gaps
    assert len(marks) >= 3
    # watermarks are not data: the counters are the file's alone
    assert m["keplerlog_agent_lines_sent_total"] == m["keplerlog_agent_lines_acked_total"] == 500
    assert m["keplerlog_agent_bytes_sent_total"] == len(data)
    assert m["keplerlog_agent_records_sent_total"] == len(reader.records[fid])
    assert m["keplerlog_agent_watermarks_sent_total"] >= len([w for w in marks if w.ts_ms <= stop_ms])
    assert m["keplerlog_agent_watermarks_failed_total"] == 0


@pytest.mark.kafka
def test_truncation_with_unread_bytes(tmp_path, kafka, topic, logdir, reader):
    """Lines written while the agent coalesces reads (it saw the size, did not read yet) and then
    truncated away: the old id's watermark says gone, exactly those bytes lost."""
    log = logdir / "portal.log"
    log.write_bytes(b"")
    port = free_port()
    cfg = write_config(
        tmp_path,
        kafka.bootstrap,
        topic,
        [str(logdir / "*.log")],
        limits={"read_coalesce_ms": 5000},
        metrics={"port": port},
    )
    agent = AgentProcess(cfg, tmp_path / "agent.out").start()
    first, unread = lines("first", 100), lines("unread", 77)
    # written as an application writes: through one open descriptor. A close after each write
    # (append()) is a second inotify event that can start the agent's 5 s window before the
    # next write, which it then does not look at before the window ends.
    app = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        reader.wait_for(lambda: metrics(port).get("keplerlog_agent_files_open") == 1)
        os.write(app, first)  # idle file: read at once
        reader.wait_contents({str(log): [first]})
        (old,) = reader.records
        os.write(app, unread)  # within 5 s of the last read: looked at (size), read later
        time.sleep(1)
        os.truncate(log, 0)
        reader.wait_for(lambda: any(w.state == "gone" for w in reader.marks_of(old)), timeout=20)
        m = metrics(port)
    finally:
        os.close(app)
        assert agent.stop() == 0, agent.output()
    (mark,) = [w for w in reader.marks_of(old) if w.state == "gone"]
    end = len(first) + len(unread)
    assert (mark.first, mark.acked, mark.seen) == (0, len(first), end)
    assert mark.lost == ((len(first), end, "truncated"),)
    assert f"{len(unread)} bytes of {old} were truncated before they were read" in agent.output()
    assert m["keplerlog_agent_lost_bytes_total"] == len(unread)
    assert reader.content(old) == first
    _check_order(reader, old)


@pytest.mark.kafka
def test_a_waiting_file_deleted_before_it_was_opened(tmp_path, kafka, topic, logdir, reader):
    """Two busy files hold the only two slots; the third waits, and is deleted while it waits."""
    busy = [logdir / "a-busy.log", logdir / "b-busy.log"]
    waiting = logdir / "c-waiting.log"
    append(waiting, lines("never", 40))
    stop = threading.Event()

    def write(path: Path) -> None:
        n = 0
        while not stop.is_set():
            append(path, lines(path.stem, 2, n))
            n += 2
            time.sleep(0.1)

    writers = [threading.Thread(target=write, args=(p,), daemon=True) for p in busy]
    for w in writers:
        w.start()
    port = free_port()
    cfg = write_config(
        tmp_path,
        kafka.bootstrap,
        topic,
        [str(logdir / "*.log")],
        limits={"max_open_files": 2},
        metrics={"port": port},
    )
    agent = AgentProcess(cfg, tmp_path / "agent.out").start()
    try:
        reader.wait_for(lambda: metrics(port).get("keplerlog_agent_files_waiting") == 1)
        st = waiting.stat()
        time.sleep(1.5)  # rescans every second while a file waits: it still gets no slot
        assert metrics(port)["keplerlog_agent_files_waiting"] == 1
        waiting.unlink()
        fid = f"w:{st.st_dev}:{st.st_ino}"
        reader.wait_for(lambda: bool(reader.marks_of(fid)), timeout=20)
        m = metrics(port)
    finally:
        stop.set()
        for w in writers:
            w.join()
        assert agent.stop() == 0, agent.output()
    (mark,) = reader.marks_of(fid)
    assert (mark.path, mark.first, mark.acked, mark.seen) == (str(waiting), 0, 0, st.st_size)
    assert (mark.state, mark.lost) == ("gone", ((0, st.st_size, "deleted"),))
    assert m["keplerlog_agent_lost_bytes_total"] == st.st_size
    assert str(waiting) not in reader.paths.values()  # never opened, never shipped
    assert "files wait for a descriptor slot" in agent.output()
    # The whole chain: a consumer reads the topic, and the day's audit reports exactly those
    # bytes lost at the source, nothing missing, and fails the day.
    code, total = _audit_through_a_consumer(tmp_path, kafka, topic, reader, mark.ts_ms)
    assert (code, total["lost_bytes"], total["missing_bytes"]) == (1, st.st_size, 0), total


@pytest.mark.kafka
def test_a_file_rotated_away_while_the_agent_was_stopped(tmp_path, kafka, topic, logdir, reader):
    """The agent stops having seen bytes it could not ship in time (a 0 s drain, 64 KiB read-ahead);
    the file gets more lines, is rotated out of the glob and deleted before the agent is back.
    It can report the bytes it had seen, not the ones written after it stopped."""
    log = logdir / "portal.log"
    first = lines("first", 100)
    append(log, first)
    port = free_port()
    cfg = write_config(
        tmp_path,
        kafka.bootstrap,
        topic,
        [str(logdir / "*.log")],
        kafka={"max_record_bytes": 65536},
        limits={"max_buffer_bytes": 65536, "shutdown_timeout_s": 0},
        metrics={"port": port},
    )
    agent = AgentProcess(cfg, tmp_path / "agent.out").start()
    reader.wait_contents({str(log): [first]})
    (fid,) = reader.records
    agent.signal(signal.SIGSTOP)
    append(log, lines("late", 40_000))  # 2.4 MB the stopped agent sees only when told to stop
    agent.signal(signal.SIGTERM)
    agent.signal(signal.SIGCONT)
    assert agent.wait(30) == 0, agent.output()
    state = json.loads((tmp_path / "state" / "agent-state.json").read_text())["files"][fid]
    acked, seen = state["offset"], state["seen"]
    assert len(first) <= acked < seen == log.stat().st_size  # the fault: seen, not all shipped
    append(log, lines("after-stop", 100))  # nobody sees these
    os.rename(log, logdir / "portal.log.1")  # rotated out of the glob...
    (logdir / "portal.log.1").unlink()  # ...and gone before the agent is back
    agent = AgentProcess(cfg, tmp_path / "agent2.out").start()
    try:
        reader.wait_for(lambda: any(w.state == "gone" for w in reader.marks_of(fid)), timeout=30)
        m = metrics(port)
    finally:
        assert agent.stop() == 0, agent.output()
    (mark,) = [w for w in reader.marks_of(fid) if w.state == "gone"]
    assert (mark.first, mark.acked, mark.seen, mark.path) == (0, acked, seen, str(log))
    assert mark.lost == ((acked, seen, "rotated"),)
    assert m["keplerlog_agent_lost_bytes_total"] == seen - acked
    assert f"{seen - acked} bytes seen and never shipped" in agent.output()
    assert "rotated away while the agent was stopped, not found" in agent.output()
    _check_order(reader, fid)
    # through the whole chain: the audit of the day says exactly these bytes were lost
    code, total = _audit_through_a_consumer(tmp_path, kafka, topic, reader, mark.ts_ms)
    assert (code, total["lost_bytes"], total["missing_bytes"]) == (1, seen - acked, 0), total


@pytest.mark.kafka
def test_records_deleted_from_the_topic_before_the_consumer_read_them(tmp_path, kafka, topic, logdir, reader):
    """Retention ran before the consumer did: Kafka acknowledged every byte, then the partition's
    first records were deleted. The audit reports exactly their bytes missing (not lost at the
    source: the agent did its part) and fails the day."""
    log = logdir / "portal.log"
    agent = _agent_with_frequent_watermarks(tmp_path, kafka, topic, logdir)
    parts = [lines(f"part{i}", 50) for i in range(3)]
    try:
        for n in (1, 2):
            append(log, parts[n - 1])
            reader.wait_contents({str(log): [b"".join(parts[:n])]})
        (fid,) = reader.records
        (partition,) = {p for p, _ in reader.where[fid]}
        placed = [(o, v, k) for (o, v), (_, k) in zip(reader.records[fid], reader.where[fid], strict=True)]
        cut = min(k for o, _, k in placed if o >= len(parts[0]))  # the first record of the second part
        deleted = sum(len(v) for _, v, k in placed if k < cut)
        admin = KafkaAdminClient(bootstrap_servers=kafka.admin_bootstrap)
        try:
            done = admin.delete_records({TopicPartition(topic, partition): cut})
        finally:
            admin.close()
        assert [d["low_watermark"] for d in done.values()] == [cut]  # the fault happened, on the broker
        append(log, parts[2])
        data = b"".join(parts)
        reader.wait_contents({str(log): [data]})
        reader.wait_for(lambda: any(w.acked == len(data) for w in reader.marks_of(fid)))
        stop_ms = _ms_before_stop()
    finally:
        assert agent.stop() == 0, agent.output()
    reader.wait_for(lambda: any(w.ts_ms > stop_ms for w in reader.marks_of(fid)))  # the last one
    assert deleted == len(parts[0])  # the records held exactly the first part
    left = len([1 for _, p, k in reader.marks if p == partition and k >= cut])
    root = _consume_watermarks(tmp_path, kafka, topic, left)
    assert (root / "shop" / f"portal.{_day(stop_ms)}").read_bytes() == parts[1] + parts[2]
    code, body = _audit(root, _day(stop_ms))
    total = body["total"]
    assert (code, total["shipped"], total["missing_bytes"], total["lost_bytes"]) == (
        1,
        len(data),
        deleted,
        0,
    ), body
    assert total["stored"] == len(data) - deleted


@pytest.mark.kafka
def test_an_agent_killed_for_good_is_silent_the_next_day(tmp_path, kafka, topic, logdir, reader):
    """kill -9 while the application writes, never started again. Its last watermark is its
    account: everything it claims acknowledged is stored, so the day has nothing missing; the
    bytes written after that watermark no agent reports, so the next day, when another host is
    heard, the audit lists this one as silent and fails."""
    log = logdir / "portal.log"
    agent = _agent_with_frequent_watermarks(tmp_path, kafka, topic, logdir)
    first = lines("first", 200)
    append(log, first)
    reader.wait_contents({str(log): [first]})
    (fid,) = reader.records
    writer = LiveWriter(log)
    writer.start()
    try:
        # mid-stream: the live lines are being shipped and accounted for when the kill comes
        reader.wait_for(lambda: any(w.acked > len(first) for w in reader.marks_of(fid)))
        agent.signal(signal.SIGKILL)
        assert agent.wait(10) == -signal.SIGKILL
        time.sleep(0.5)  # the application goes on writing: nobody reads these
    finally:
        writer.done.set()
        writer.join()
    today = _day(reader.marks_of(fid)[-1].ts_ms)
    tomorrow_ms = (calendar.timegm(time.strptime(today, "%Y%m%d")) + 86_400 + 30) * 1000
    alive = Watermark(
        service="shop",
        module="portal",
        host="alive-host",
        path="/app/portal.log",
        file_id="w:1:1",
        ts_ms=tomorrow_ms,
        first=0,
        seen=0,
        acked=0,
        state="open",
        lost=(),
    )
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    try:
        producer.send(topic, alive.value(), key=alive.key(), headers=alive.headers()).get(30)
    finally:
        producer.close()
    reader.wait_for(lambda: any(w.host == "alive-host" for w, _, _ in reader.marks))
    last = max(w.acked for w in reader.marks_of(fid))  # same key, same partition: all read by now
    assert len(first) < last < log.stat().st_size  # the fault: bytes no watermark accounts for
    # the alive host's watermark is dated tomorrow: a day ahead at most just after midnight
    root = _consume_watermarks(tmp_path, kafka, topic, len(reader.marks), ts_max_ahead_s=2 * 86_400)
    stored = (root / "shop" / f"portal.{today}").read_bytes()
    assert last <= len(stored) < log.stat().st_size and stored == log.read_bytes()[: len(stored)]
    code, body = _audit(root, today)
    total = body["total"]
    assert (code, total["shipped"], total["missing_bytes"], total["lost_bytes"], body["silent"]) == (
        0,
        last,
        0,
        0,
        [],
    ), body
    code, body = _audit(root, _day(tomorrow_ms))
    assert code == 1 and [(s["host"], s["service"]) for s in body["silent"]] == [("test-host", "shop")], body
    assert body["total"]["missing_bytes"] == 0


@pytest.mark.kafka
def test_watermarks_off(tmp_path, kafka, topic, logdir, reader):
    """interval_s 0: a shipped file, a rotation (finished) and a stop, and not one watermark."""
    log = logdir / "portal.log"
    data = lines("off", 200)
    append(log, data)
    port = free_port()
    cfg = write_config(
        tmp_path,
        kafka.bootstrap,
        topic,
        [str(logdir / "*.log")],
        watermarks={"interval_s": 0},
        metrics={"port": port},
    )
    agent = AgentProcess(cfg, tmp_path / "agent.out").start()
    try:
        reader.wait_contents({str(log): [data]})
        os.rename(log, logdir / "portal.log.1")
        newer = lines("newer", 10)
        append(log, newer)
        reader.wait_contents({str(log): [data, newer]})
        deadline = time.monotonic() + 20
        while metrics(port)["keplerlog_agent_files_closed_total"] < 1:  # the rotated file finished
            assert time.monotonic() < deadline, "the rotated file was never finished"
            time.sleep(0.2)
        m = metrics(port)
    finally:
        assert agent.stop() == 0, agent.output()
    reader.poll(timeout_ms=2000)
    assert not reader.marks
    assert m["keplerlog_agent_watermarks_sent_total"] == 0
    assert re.search(r"finished \S+ \(\S+\) at offset", agent.output())


def test_the_ended_files_waiting_for_kafka_are_capped(monkeypatch, caplog):
    from keplerlog.agent import watermarks

    monkeypatch.setattr(watermarks, "MAX_ENDED", 100)
    book = Book(True)
    for i in range(250):  # files rotated away while Kafka is away: their last accounts wait
        book.lose(f"id{i}", 0, 10, "deleted")
        book.end(f"id{i}", watermarks.Ended(f"/l/{i}.log", "m", 0, 10, 0))
    assert len(book.ended) == 100 and book.dropped == 150
    assert next(iter(book.ended)) == "id150" and "id149" not in book.lost  # the oldest went
    assert sum("ended files wait" in r.message for r in caplog.records) == 1

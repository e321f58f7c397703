"""SIGTERM: the agent reads every followed file to its end, ships it and checkpoints the acks.

The bytes at risk are the ones written after the agent's last wake-up (supervisord stops the
application first, so its last lines are exactly those). The tests make them certain: the agent
is frozen with SIGSTOP, the files change, and SIGTERM is pending when it resumes, so nothing can
be read before the stop request is seen.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from agent_support import AgentProcess, FakeSender, append, in_process, lines, write_config

from keplerlog.agent.ledger import SEND_BACKOFF_S
from keplerlog.agent.main import Agent
from keplerlog.record import is_watermark


def _state_offsets(tmp_path: Path) -> list[int]:
    files = json.loads((tmp_path / "state" / "agent-state.json").read_text())["files"]
    return sorted(v["offset"] for v in files.values())


def _checkpointed(tmp_path: Path, offsets: list[int]) -> bool:
    return (tmp_path / "state" / "agent-state.json").exists() and _state_offsets(tmp_path) == offsets


@pytest.mark.kafka
def test_sigterm_reads_every_file_to_its_end_first(tmp_path, kafka, topic, logdir, reader):
    log = logdir / "app.log"
    append(log, lines("before", 200))
    paths = [str(logdir / "*.log")]
    cfg = write_config(tmp_path, kafka.bootstrap, topic, paths, limits={"close_inactive_s": 30})
    agent = AgentProcess(cfg, tmp_path / "agent.out").start()
    try:
        reader.wait_contents({str(log): [log.read_bytes()]})
        time.sleep(0.5)  # idle, blocked in its wait
        agent.signal(signal.SIGSTOP)
        # While it cannot wake up: a burst, a rename rotation whose old file still grows, a new
        # file, and partial last lines in both (no newline yet).
        append(log, lines("burst", 5000))
        rotated = logdir / "app.log.1"
        os.rename(log, rotated)
        append(rotated, lines("late", 50) + b"partial tail of the rotated file")
        append(log, lines("new", 300) + b"partial tail of the new file")
        other = logdir / "other.log"
        append(other, lines("other", 100))
        # The fault happened: none of these bytes reached Kafka before the stop.
        reader.poll(timeout_ms=1000)
        assert not [v for _, v in reader.batches if b"burst" in v or b"new" in v or b"other" in v]
        agent.signal(signal.SIGTERM)
        agent.signal(signal.SIGCONT)
        assert agent.wait(30) == 0, agent.output()
    finally:
        agent.stop()
    out = agent.output()
    assert "not acknowledged" not in out, out
    reader.wait_contents(
        {str(log): [rotated.read_bytes(), log.read_bytes()], str(other): [other.read_bytes()]}, timeout=10
    )
    # the checkpoint holds every byte as acknowledged: a restart re-sends nothing
    assert _state_offsets(tmp_path) == sorted(p.stat().st_size for p in (rotated, log, other))


# -- in process, with a sender that acknowledges only what the test says --------------------


def _stop_then(agent: Agent, change) -> None:
    """Ask the agent to stop, make `change` once it has left its loop, then let it drain.

    Whatever `change` writes comes after the agent's last wake-up: only the drain can read it.
    """
    gate = threading.Event()
    drain = agent._shutdown

    def gated() -> None:
        gate.wait(10)
        drain()

    agent._shutdown = gated  # type: ignore[method-assign]
    agent.request_stop()
    try:
        change()
    finally:
        gate.set()


def _wait(check, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_checkpoint_is_the_acknowledged_offset_not_the_read_one(tmp_path, logdir):
    log = logdir / "app.log"
    data = lines("c", 3000)  # 180 KB: several 64 KiB records
    append(log, data)
    agent, sender = in_process(tmp_path, logdir, auto_ack=False, max_buffer_bytes=1 << 20)
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        _wait(lambda: sum(len(v) for v, _ in sender.sent) == len(data))
        assert len(sender.sent) >= 3
        sender.ack(1)  # out of order: nothing is contiguous from 0 yet
        time.sleep(0.3)
        assert not (tmp_path / "state" / "agent-state.json").exists() or _state_offsets(tmp_path) == [0]
        sender.ack(0)
        first_two = len(sender.sent[0][0]) + len(sender.sent[1][0])
        _wait(lambda: _checkpointed(tmp_path, [first_two]))
        assert first_two < len(data)  # read to the end, checkpointed only what was acknowledged
    finally:
        agent.request_stop()
        thread.join(10)
    assert _state_offsets(tmp_path) == [first_two]


def test_an_ack_to_an_idle_agent_is_checkpointed_within_the_interval_not_at_the_next_rescan(tmp_path, logdir):
    log = logdir / "app.log"
    append(log, lines("i", 100))
    agent, sender = in_process(tmp_path, logdir, auto_ack=False, checkpoint_interval_ms=500)
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        _wait(lambda: len(sender.sent) == 1 and _checkpointed(tmp_path, [0]))
        time.sleep(1)  # the checkpoint interval passes: nothing left for it to write
        assert agent.fileset.watched_all  # the idle mode that sleeps until the next rescan (10 s)
        t0 = time.monotonic()
        sender.ack(0)
        _wait(lambda: _checkpointed(tmp_path, [len(sender.sent[0][0])]), timeout=20)
        took = time.monotonic() - t0
    finally:
        agent.request_stop()
        thread.join(10)
    assert took < 3, f"the acknowledged offset was checkpointed after {took:.1f} s (interval 0.5 s)"


def test_what_is_not_acknowledged_within_the_drain_timeout_is_logged_and_left(tmp_path, logdir, caplog):
    log = logdir / "app.log"
    append(log, lines("d", 100))
    agent, sender = in_process(tmp_path, logdir, auto_ack=False)
    thread = threading.Thread(target=agent.run)
    caplog.set_level(logging.INFO, logger="keplerlog.agent")
    thread.start()
    try:
        _wait(lambda: len(sender.sent) == 1)
        sender.ack(0)
        acked = len(sender.sent[0][0])
        _wait(lambda: _checkpointed(tmp_path, [acked]))
        t0 = time.monotonic()
        _stop_then(agent, lambda: append(log, lines("unacked", 500) + b"no newline"))
    finally:
        agent.request_stop()
        thread.join(10)
    took = time.monotonic() - t0
    assert not thread.is_alive()
    assert took < 3, f"the drain took {took:.1f} s with a 1 s timeout"
    pending = log.stat().st_size - acked
    # read to its end (the partial line too) and sent, but never acknowledged
    assert sum(len(v) for v, _ in sender.sent) == log.stat().st_size
    assert f"stopping with {pending} bytes not acknowledged (0 of them not read) in 1 files" in caplog.text
    assert _state_offsets(tmp_path) == [acked]  # left for the next start


def test_drain_with_a_full_buffer_waits_for_acks_and_reads_on(tmp_path, logdir):
    log = logdir / "app.log"
    agent, sender = in_process(tmp_path, logdir, auto_ack=True, max_buffer_bytes=65536, shutdown_timeout_s=5)
    thread = threading.Thread(target=agent.run)
    thread.start()
    data = lines("big", 20_000)  # 1.2 MB: 18 times the buffer
    try:
        _wait(lambda: agent.sender.connected and agent.fileset.next_scan > 0)  # scanned: no file yet
        _stop_then(agent, lambda: append(log, data))
    finally:
        agent.request_stop()
        thread.join(15)
    assert not thread.is_alive()
    assert b"".join(v for v, _ in sender.sent) == data
    assert _state_offsets(tmp_path) == [len(data)]


def test_split_lines_are_counted_and_an_undecodable_file_name_keeps_metrics_valid(tmp_path, logdir):
    # a file name that is not UTF-8 (os.fsdecode gives lone surrogates) and a line 10x the limit
    odd = logdir / os.fsdecode(b"caf\xe9-\xff.log")
    long_line = b"L" * 10_240 + b"\n"
    append(odd, b"short\n" + long_line + b"short again\n")
    agent, sender = in_process(tmp_path, logdir, auto_ack=True, max_line_bytes=1024)
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        _wait(lambda: _checkpointed(tmp_path, [odd.stat().st_size]))
        page = agent.metrics.render()  # what the metrics server sends: must encode
    finally:
        agent.request_stop()
        thread.join(10)
    assert agent.counters.lines_split == 1  # counted once per line, not per piece
    assert b"keplerlog_agent_lines_split_total 1.0\n" in page
    assert 'path="' + str(logdir) + '/caf\ufffd-\ufffd.log"' in page.decode()
    assert b"".join(v for v, _ in sender.sent) == odd.read_bytes()
    pieces = [v for v, _ in sender.sent if not v.endswith(b"\n")]
    assert [len(v) for v in pieces] == [1024] * 10  # the rest, 1 byte + newline, ends a record


def test_the_parts_share_one_file_table_and_one_step_ships_a_file(tmp_path, logdir):
    """The file set, reader and ledger work on one table of files; a scan, a read pass and the
    results of the sends ship a file once and close nothing that was not rotated."""
    log = logdir / "app.log"
    append(log, lines("n", 3))
    agent, sender = in_process(tmp_path, logdir, auto_ack=True)
    try:
        assert agent.sender is sender and agent.ledger.sender is sender
        assert agent.files is agent.fileset.files is agent.ledger.files is agent.reader.files
        assert agent.closed is agent.fileset.closed
        sender.connect()
        agent.fileset.scan(time.monotonic())
        assert len(agent.files) == 1
        assert agent.fileset.next_scan > 0
        agent.reader.read_all(time.time(), time.monotonic())
        agent.ledger.results()
        assert agent.ledger.inflight == 0 and agent.counters.records_acked == 1
        assert b"".join(v for v, _ in sender.sent) == log.read_bytes()
        agent.fileset.finish_detached(time.monotonic())  # nothing rotated: nothing closed
        assert len(agent.files) == 1 and not agent.closed
    finally:
        for f in agent.files.values():
            f.close()
        agent.watcher.close()
        agent.waker.close()


def test_a_line_is_not_cut_where_reading_paused_at_the_memory_cap(tmp_path, logdir):
    """Kafka away: the agent reads up to max_buffer_bytes, which ends mid-line, and pauses. Past
    the partial-line timeout that held piece must not be shipped as a line of its own: its end
    is in the file, only unread (seen in the 30-minute outage bench: one line in two pieces).
    Nor may the overdue timeout keep the paused agent busy."""
    log = logdir / "app.log"
    data = lines("paused", 20_000, width=137)  # 2.7 MB, lines that do not divide the cap
    append(log, data)
    agent, sender = in_process(
        tmp_path, logdir, auto_ack=False, max_buffer_bytes=65536, partial_line_timeout_ms=200
    )
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        _wait(lambda: agent.reader.paused_memory)
        held = agent.reader.held()
        cpu = time.process_time()
        time.sleep(0.8)  # four partial-line timeouts, nothing acknowledged
        # and waited for the acks, not spun on the overdue timeout (97 % of a core before)
        assert time.process_time() - cpu < 0.3
        # the fault really happened: paused with a piece of a line held, and it stayed held
        assert agent.reader.paused_memory
        assert 0 < held == agent.reader.held() < 137
        assert all(v.endswith(b"\n") for v, _ in sender.sent), "a line was cut at the pause"
        acked = 0
        deadline = time.monotonic() + 30
        while sum(len(v) for v, _ in sender.sent) < len(data):  # Kafka is back: everything acked
            assert time.monotonic() < deadline, "not shipped after the acks"
            # the agent thread appends to `sent` meanwhile: ack up to one length read once (a
            # second len() could skip a record appended in between, never acked: CI saw it stall)
            sent = len(sender.sent)
            for i in range(acked, sent):
                sender.ack(i)
            acked = sent
            time.sleep(0.01)
    finally:
        agent.request_stop()
        thread.join(15)
    assert not thread.is_alive()
    assert b"".join(v for v, _ in sender.sent) == data
    assert all(v.endswith(b"\n") for v, _ in sender.sent)


class _RefusingSender(FakeSender):
    """A producer that refuses data records synchronously, as librdkafka's produce() does once
    its producer is fatal (KafkaError _FATAL), the first `refusals` times."""

    def __init__(self, wake, refusals: int) -> None:
        super().__init__(wake, auto_ack=True)
        self.refusals = refusals
        self.refused_at: list[float] = []

    def send(self, value: bytes, key: bytes, headers: list, token: tuple) -> None:
        if self.refusals and not is_watermark(headers):
            self.refusals -= 1
            self.refused_at.append(time.monotonic())
            raise RuntimeError("Unable to produce message: Local: Fatal error")
        super().send(value, key, headers, token)


def test_a_send_refused_at_once_pauses_the_read_pass_instead_of_spinning_on_it(tmp_path, logdir):
    """A synchronous refusal re-reads from the record's offset after SEND_BACKOFF_S. The read pass
    went on at once instead: read, refused, rewound, read... in one tight loop that starved the
    main loop (and, with the producer fatal, its renewal). Seen with librdkafka in
    test_broker_replaced_by_an_empty_one: 1.6 million refusals in 60 s, nothing shipped."""
    log = logdir / "app.log"
    data = lines("r", 100)
    append(log, data)
    agent, _ = in_process(tmp_path, logdir, auto_ack=True)
    sender = _RefusingSender(agent.waker.wake, refusals=3)
    agent.sender = sender  # type: ignore[assignment]
    thread = threading.Thread(target=agent.run)
    thread.start()
    try:
        _wait(lambda: sum(len(v) for v, _ in sender.sent) == len(data), timeout=20)
    finally:
        agent.request_stop()
        thread.join(10)
    assert len(sender.refused_at) == 3 and agent.counters.send_errors == 3  # the fault happened
    gaps = [b - a for a, b in zip(sender.refused_at, sender.refused_at[1:], strict=False)]
    assert min(gaps) >= 0.9 * SEND_BACKOFF_S, f"refusals {gaps} s apart: no backoff"
    assert b"".join(v for v, _ in sender.sent) == data  # sent once, after the refusals

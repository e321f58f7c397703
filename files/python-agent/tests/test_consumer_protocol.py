"""The consumer's write protocol, killed at every step, without a broker.

A batch is made durable in this order: intent `write` -> append to each day file -> fsync ->
intent `commit` -> partition state files -> intent removed; only then does app.py commit the
Kafka offsets. Each test kills the process at one step (an exception no `except OSError` catches,
then the process's locks and descriptors released as a kill -9 would), recovers with a fresh Sink
under a new consumer id, re-reads from where the recovery says to resume (the Kafka commit only
where no state exists) and checks that the day files hold every line exactly once and that the
state agrees with them.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import namedtuple
from concurrent.futures import Future
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
from consumer_support import ANY_TIME, die
from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from keplerlog.consumer import intents
from keplerlog.consumer.app import ConsumerApp
from keplerlog.consumer.config import load_config
from keplerlog.consumer.files import FileCache, FileOps
from keplerlog.consumer.journal import Journal
from keplerlog.consumer.metrics import Metrics
from keplerlog.consumer.route import Router
from keplerlog.consumer.sink import Sink
from keplerlog.layout import Layout
from keplerlog.paths import PathGuard
from keplerlog.record import Batch

Rec = namedtuple("Rec", "topic partition offset timestamp headers value")
DAY = 1_700_000_000_000  # 2023-11-14 UTC
P0, P1 = ("t", 0), ("t", 1)


class Killed(BaseException):
    """The process dies here (a BaseException: no `except OSError` or `except Exception` stops it)."""


def make_sink(root, cid: str, ops: FileOps | None = None) -> Sink:
    router = Router(
        Layout("{service}/{module}.{day}"), ZoneInfo("UTC"), PathGuard(str(root)), ts_window=ANY_TIME
    )
    return Sink(router, FileCache(str(root), 64, 60, ops), Journal(str(root), cid), Metrics())


def stream(module: str, partition: int, n: int) -> list[Rec]:
    """n records of one source file on one partition; record i carries 3 lines."""
    out, offset = [], 0
    for i in range(n):
        value = b"".join(f"{module} {i} {j}\n".encode() for j in range(3))
        b = Batch("shop", module, "h1", f"/app/{module}.log", f"{module}-id", offset, 3, DAY)
        out.append(Rec("t", partition, i, DAY, b.headers(), value))
        offset += len(value)
    return out


PORTAL = stream("portal", 0, 9)
BILLING = stream("billing", 1, 6)
# Batches as polled: the first only has P0, so P1 has no state file when the second one dies.
BATCHES = [
    {P0: PORTAL[0:3]},
    {P0: PORTAL[3:6], P1: BILLING[0:3]},
    {P0: PORTAL[6:9], P1: BILLING[3:6]},
]
EXPECTED = {
    "shop/portal.20231114": b"".join(r.value for r in PORTAL),
    "shop/billing.20231114": b"".join(r.value for r in BILLING),
}


def run_batches(sink: Sink, batches, committed: dict) -> None:
    for batch in batches:
        committed.update(sink.write(batch))  # app.py commits what write() returned


def day_files(root) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".keplerlog" not in p.parts
    }


def recover_and_finish(root, committed: dict) -> Sink:
    """A fresh consumer takes both partitions and reads on from where recovery says."""
    fresh = make_sink(root, "fresh")
    resume = fresh.assign([P0, P1])
    # the state file is authoritative; the Kafka commit counts only where there is no state
    start = {tp: resume.get(tp, committed.get(tp, 0)) for tp in (P0, P1)}
    for batch in BATCHES:
        rest = {tp: [r for r in recs if r.offset >= start[tp]] for tp, recs in batch.items()}
        rest = {tp: recs for tp, recs in rest.items() if recs}
        if rest:
            fresh.write(rest)
    return fresh


def check(root, fresh: Sink) -> None:
    assert day_files(root) == EXPECTED  # every line exactly once, in order
    reader = Journal(str(root), "reader")
    assert reader.recover() == []  # nothing left to roll back or forward
    assert fresh.journal.pending() is None
    assert not list((root / ".keplerlog/state").glob("victim.*"))  # its intent was removed
    for tp, recs in ((P0, PORTAL), (P1, BILLING)):
        state = reader.load(*tp)
        assert state.next_offset == recs[-1].offset + 1
        ((_, start, end),) = state.files.values()  # one written range, no hole
        assert (start, end) == (0, len(b"".join(r.value for r in recs)))  # == bytes on disk
    reader.close()
    assert fresh.metrics.counts["gaps"] == 0


# (object, method) steps of Sink._append, killed before or after the step took effect
STEPS = [
    ("journal", "begin"),
    ("files", "append"),
    ("files", "sync"),
    ("journal", "commit"),
    ("journal", "save_states"),
    ("journal", "clear"),
]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize(("part", "method"), STEPS)
@pytest.mark.parametrize("batch_no", [1, 2])
def test_killed_at_each_step_recovers_exactly_once(tmp_path, part, method, when, batch_no):
    sink = make_sink(tmp_path, "victim")
    committed: dict = {}
    run_batches(sink, BATCHES[:batch_no], committed)
    obj = getattr(sink, part)
    real = getattr(obj, method)
    calls = {"n": 0}

    def killed(*args, **kwargs):
        calls["n"] += 1
        if when == "before":
            raise Killed
        real(*args, **kwargs)
        raise Killed

    setattr(obj, method, killed)
    with pytest.raises(Killed):
        sink.write(BATCHES[batch_no])
    assert calls["n"] == 1  # the fault happened, at this step
    die(sink)
    check(tmp_path, recover_and_finish(tmp_path, committed))


@pytest.mark.parametrize("after_bytes", [0, 1, 7, 20])
def test_killed_in_the_middle_of_an_append(tmp_path, after_bytes):
    """A torn append (some bytes of a record on disk, the rest never written)."""
    armed = {"on": False, "hit": 0}

    def write(fd, data):
        if armed["on"]:
            armed["hit"] += 1
            os.write(fd, bytes(data[:after_bytes]))
            raise Killed
        return os.write(fd, data)

    sink = make_sink(tmp_path, "victim", FileOps(write=write))
    committed: dict = {}
    run_batches(sink, BATCHES[:1], committed)
    armed["on"] = True
    with pytest.raises(Killed):
        sink.write(BATCHES[1])
    assert armed["hit"] == 1
    die(sink)
    check(tmp_path, recover_and_finish(tmp_path, committed))


def _tear_latest_intent(root) -> int:
    """Spoil the newest intent record's last bytes, as a crash during its in-place write would.

    Returns the phase the torn record announced's sequence number (the fault, to assert on)."""
    slots = sorted((root / ".keplerlog/state").glob("victim.intent.*"))
    newest = max(slots, key=lambda p: (intents.decode(p.read_bytes()) or (-1,))[0])
    data = bytearray(newest.read_bytes())
    seq, _ = intents.decode(bytes(data))
    header = data[: data.index(b"\n") + 1]
    end = len(header) + int(header.split()[2])  # the record's end, not an older record's tail
    data[end - 4 : end] = b"\0\0\0\0"
    newest.write_bytes(bytes(data))
    assert intents.decode(bytes(data)) is None  # now torn
    return seq


# A record torn by the crash counts as never written: the same outcome as a kill before the step.
@pytest.mark.parametrize("method", ["begin", "commit", "clear"])
@pytest.mark.parametrize("batch_no", [1, 2])
def test_killed_while_writing_an_intent_record_recovers_exactly_once(tmp_path, method, batch_no):
    sink = make_sink(tmp_path, "victim")
    committed: dict = {}
    run_batches(sink, BATCHES[:batch_no], committed)
    real = getattr(sink.journal, method)

    def killed(*args, **kwargs):
        real(*args, **kwargs)
        raise Killed

    setattr(sink.journal, method, killed)
    with pytest.raises(Killed):
        sink.write(BATCHES[batch_no])
    die(sink)
    torn_seq = _tear_latest_intent(tmp_path)
    # the previous record is intact and is what recovery sees
    previous = intents.read_latest(intents.slot_paths(tmp_path / ".keplerlog/state", "victim"))
    assert previous is not None
    assert previous["phase"] == {"begin": "done", "commit": "write", "clear": "commit"}[method]
    assert torn_seq == 3 * batch_no + {"begin": 1, "commit": 2, "clear": 3}[method]
    check(tmp_path, recover_and_finish(tmp_path, committed))


def test_clean_run_is_the_reference(tmp_path):
    sink = make_sink(tmp_path, "clean")
    committed: dict = {}
    run_batches(sink, BATCHES, committed)
    assert committed == {P0: 9, P1: 6}
    check(tmp_path, sink)


# -- app.py: Kafka offsets are committed only after the batch is durable -----------------------


class FakeConsumer:
    """Serves BATCHES from poll(); records every commit with what was durable at that moment."""

    def __init__(self, app: ConsumerApp) -> None:
        self.app = app
        self.listener = None
        self.todo = [{TopicPartition(*tp): recs for tp, recs in b.items()} for b in BATCHES]
        self.assigned = False
        self.commits: list[tuple[dict, dict]] = []
        self.durable: dict = {}
        self.lock = threading.Lock()
        self.in_flight: list = []  # asynchronous commits not answered yet
        self.polls = 0
        self.answer_every = 1  # polls until the coordinator answers an asynchronous commit
        self.sync_commits = 0

    def subscribe(self, topics, listener):
        self.listener = listener

    def poll(self, timeout_ms=0):
        if not self.assigned:
            self.assigned = True
            self.listener.on_partitions_assigned([TopicPartition(*P0), TopicPartition(*P1)])
        self.polls += 1
        if self.polls % self.answer_every == 0:  # kafka-python runs commit callbacks inside poll
            for future, callback, offsets in self.in_flight:
                future.is_done = True
                callback(offsets, object())  # an OffsetCommitResponse
            self.in_flight.clear()
        if self.todo:
            return self.todo.pop(0)
        self.app.stop()
        return {}

    def assignment(self):
        return {TopicPartition(*P0), TopicPartition(*P1)}

    def paused(self):
        return set()

    def pause(self, *tps):
        pass

    def resume(self, *tps):
        pass

    def seek(self, tp, offset):
        pass

    def highwater(self, tp):
        """The partition's end as the broker would report it: all of BATCHES."""
        key = (tp.topic, tp.partition)
        return max((r.offset + 1 for b in BATCHES for recs in [b.get(key, [])] for r in recs), default=None)

    def _record(self, offsets):
        with self.lock:
            self.commits.append(
                ({(tp.topic, tp.partition): m.offset for tp, m in offsets.items()}, dict(self.durable))
            )

    def commit(self, offsets):
        self._record(offsets)
        self.sync_commits += 1

    def commit_async(self, offsets, callback):
        self._record(offsets)
        future = SimpleNamespace(is_done=False)
        self.in_flight.append((future, callback, offsets))
        return future

    def close(self, autocommit=False):
        pass


def _app_with_fake_kafka(tmp_path) -> tuple[ConsumerApp, FakeConsumer]:
    env = {
        "KEPLERLOG_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "KEPLERLOG_ROOT": str(tmp_path),
        "KEPLERLOG_METRICS_PORT": "0",
    }
    app = ConsumerApp(load_config(None, env))
    return app, FakeConsumer(app)


def test_kafka_offsets_are_committed_only_after_the_batch_is_durable(tmp_path):
    app, fake = _app_with_fake_kafka(tmp_path)
    write = app.sink.write
    probe = Journal(str(tmp_path), "probe")

    def durable_write(batch):
        offsets = write(batch)
        # what a crash from now on leaves on disk: the state files
        with fake.lock:
            for tp in offsets:
                fake.durable[tp] = probe.load(*tp).next_offset
        return offsets

    app.sink.write = durable_write
    app.run(consumer=fake)
    assert fake.commits, "nothing was committed"
    for offsets, durable in fake.commits:
        for tp, offset in offsets.items():
            assert offset <= (durable.get(tp) or 0), f"committed {tp}@{offset} while durable was {durable}"
    assert {tp: off for c, _ in fake.commits for tp, off in c.items()} == {P0: 9, P1: 6}
    assert app.metrics.lag == {P0: 0, P1: 0}  # high watermark - committed, once all is durable


def test_the_consumer_settles_the_collector_once_subscribed(tmp_path, monkeypatch):
    """keplerlog/gctune.py: once started (client made, subscribed), before the first batch."""
    from keplerlog import gctune

    app, fake = _app_with_fake_kafka(tmp_path)
    seen: list[tuple[int, bool]] = []
    monkeypatch.setattr(gctune, "settle", lambda: seen.append((len(fake.commits), app.consumer is fake)))
    app.run(consumer=fake)
    assert seen == [(0, True)] and fake.commits


def test_offsets_durable_while_a_commit_is_in_flight_go_in_the_next_one(tmp_path):
    """At most one asynchronous commit in flight: the offsets of the batches durable meanwhile
    are merged into the next one; at shutdown an unanswered one is sent again, synchronously."""
    app, fake = _app_with_fake_kafka(tmp_path)
    app.consumer = fake
    fake.assigned = True  # no rebalance in this test
    app._commit({P0: 3})
    app._commit({P0: 6})
    app._commit({P1: 2})
    app._send_commits()
    assert [c for c, _ in fake.commits] == [{P0: 3}]  # the others wait for its answer
    assert app._committed == {}
    fake.poll()  # the coordinator answers
    assert app._committed == {TopicPartition(*P0): 3}
    app._send_commits()
    assert [c for c, _ in fake.commits] == [{P0: 3}, {P0: 6, P1: 2}]
    app._commit({P0: 9})
    app._send_commits(sync=True)  # shutdown: {P0: 6, P1: 2} unanswered, {P0: 9} not sent
    assert [c for c, _ in fake.commits][2:] == [{P0: 9, P1: 2}]
    assert fake.sync_commits == 1
    assert app._committed == {TopicPartition(*P0): 9, TopicPartition(*P1): 2}
    assert app.metrics.counts["commit_failures"] == 0
    app._commit_done({TopicPartition(*P0): OffsetAndMetadata(6, "", -1)}, object())  # a late answer
    assert app._committed[TopicPartition(*P0)] == 9  # never moves back
    app._commit_done({TopicPartition(*P0): OffsetAndMetadata(12, "", -1)}, KafkaError("rebalanced"))
    assert app._committed[TopicPartition(*P0)] == 9 and app.metrics.counts["commit_failures"] == 1


# -- batch gathering: wait for more records only while it pays -------------------------------


class ScriptedPolls:
    """poll() that brings one record on the first call, then one every `every_s` (None: never).

    `behind`: the broker holds more than each poll brings (a consumer catching up); otherwise
    each poll brings the partition up to its high watermark.
    """

    def __init__(self, every_s: float | None, behind: bool = False) -> None:
        self.every_s = every_s
        self.behind = behind
        self.timeouts: list[int] = []
        self.n = 0

    def highwater(self, tp):
        return self.n + (1000 if self.behind else 0)

    def poll(self, timeout_ms=0, max_records=None):
        self.timeouts.append(timeout_ms)
        self.n += 1
        if self.n == 1:
            return {P0: [Rec(b"x\n", 0)]}
        if self.every_s is not None and self.every_s * 1000 <= timeout_ms:
            time.sleep(self.every_s)
            return {P0: [Rec(b"x\n", self.n)]}
        time.sleep(timeout_ms / 1000)
        return {}


Rec = namedtuple("Rec", "value offset")


def _gathering_app(tmp_path, idle_ms: int, max_wait_ms: int) -> ConsumerApp:
    cfg = load_config(
        None,
        {
            "KEPLERLOG_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "KEPLERLOG_ROOT": str(tmp_path),
            "KEPLERLOG_METRICS_PORT": "0",
        },
    )
    return ConsumerApp(dataclasses.replace(cfg, batch_idle_ms=idle_ms, batch_max_wait_ms=max_wait_ms))


def _gather(app: ConsumerApp, polls: ScriptedPolls) -> tuple[int, float]:
    app.consumer = polls
    t0 = time.monotonic()
    batch = app._gather()
    return sum(len(v) for v in batch.values()), time.monotonic() - t0


def test_a_caught_up_batch_is_written_at_once_when_the_writer_is_idle(tmp_path):
    """The poll reached the high watermark: no second poll, no idle wait."""
    app = _gathering_app(tmp_path, idle_ms=5, max_wait_ms=1000)
    records, took = _gather(app, ScriptedPolls(0.002))
    assert records == 1
    assert took < 0.2, f"waited {took:.3f} s for records that were not coming"
    assert app.consumer.timeouts == [500]  # the first poll only


def test_an_idle_poll_ends_the_batch_when_the_high_watermark_is_unknown(tmp_path):
    app = _gathering_app(tmp_path, idle_ms=5, max_wait_ms=1000)
    polls = ScriptedPolls(None)
    polls.highwater = lambda tp: None  # no fetch response has said it yet
    records, took = _gather(app, polls)
    assert records == 1
    assert took < 0.2, f"waited {took:.3f} s for records that were not coming"
    assert app.consumer.timeouts[1:] == [5]


def test_records_closer_than_the_idle_time_keep_a_lagging_batch_open_to_its_limit(tmp_path):
    """Past the threshold: a record every 2 ms (idle time 5 ms) while the broker holds more than
    each poll brings never ends the batch early."""
    app = _gathering_app(tmp_path, idle_ms=5, max_wait_ms=300)
    records, took = _gather(app, ScriptedPolls(0.002, behind=True))
    assert took >= 0.29  # the limit, to the ms the poll timeouts are counted in
    assert records > 20


def test_a_busy_writer_keeps_the_batch_gathering_until_it_is_done(tmp_path):
    app = _gathering_app(tmp_path, idle_ms=5, max_wait_ms=2000)
    busy: Future = Future()
    app._inflight = (busy, {})
    threading.Timer(0.3, busy.set_result, args=({},)).start()
    records, took = _gather(app, ScriptedPolls(None))
    assert busy.done()
    assert 0.3 <= took < 1.0, took  # ended once the writer was free, not at the 2 s limit
    assert records == 1
    app._inflight = None


def test_idle_ms_zero_always_waits_the_whole_batch_time(tmp_path):
    app = _gathering_app(tmp_path, idle_ms=0, max_wait_ms=300)
    records, took = _gather(app, ScriptedPolls(None))
    assert took >= 0.29  # the limit, to the ms the poll timeouts are counted in
    assert records == 1

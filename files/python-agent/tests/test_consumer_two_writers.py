"""Two consumers sharing one data root: one writer per file and per partition (locks.py).

Files fed by several partitions (quarantine, legacy, a flat layout) get appends from two
consumers. Before the file locks, one consumer's disk-full rollback or crash recovery truncated
lines the other had committed, and a consumer that lost its partition while stalled still
wrote and saved state for it next to the new owner.
"""

import errno
import os
import threading
import time
from collections import namedtuple
from zoneinfo import ZoneInfo

import pytest
from consumer_support import ANY_TIME, die

from keplerlog.consumer.files import FileCache, FileOps
from keplerlog.consumer.journal import Journal
from keplerlog.consumer.metrics import Metrics
from keplerlog.consumer.route import Router
from keplerlog.consumer.sink import Sink
from keplerlog.layout import Layout
from keplerlog.paths import PathGuard
from keplerlog.record import Batch

Rec = namedtuple("Rec", "topic partition offset timestamp headers value")
NOW = 1_700_000_000_000
FLAT = "portal.20231114"  # layout {module}.{day}: services shop and bank share the file


class Killed(BaseException):
    """The process dies here (nothing catches a BaseException)."""


def make_sink(root, cid, ops=None):
    router = Router(Layout("{module}.{day}"), ZoneInfo("UTC"), PathGuard(str(root)), ts_window=ANY_TIME)
    return Sink(router, FileCache(str(root), 16, 60, ops), Journal(str(root), cid), Metrics())


def records(service, partition, n, start=0, per=3):
    """n records of `per` lines each of one source file; record k starts at Kafka offset k."""
    out, offset = [], 0
    for k in range(start + n):
        value = b"".join(f"{service} rec {k} line {i} {'z' * 40}\n".encode() for i in range(per))
        b = Batch(service, "portal", "h", f"/{service}.log", f"{service}-f", offset, per, NOW)
        if k >= start:
            out.append(Rec("t", partition, k, NOW, b.headers(), value))
        offset += len(value)
    return out


def expected_lines(*streams):
    return sorted(line for s in streams for r in s for line in r.value.splitlines(keepends=True))


def file_lines(root):
    return sorted((root / FLAT).read_bytes().splitlines(keepends=True))


def test_disk_full_rollback_of_one_never_cuts_the_others_lines(tmp_path):
    fail = {"every": 3, "n": 0}

    def flaky_write(fd, data):
        fail["n"] += 1
        if fail["n"] % fail["every"] == 0:
            os.write(fd, bytes(data[: len(data) // 2]))  # half an append, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    a = make_sink(tmp_path, "a", FileOps(write=flaky_write))
    b = make_sink(tmp_path, "b")
    shop, bank = records("shop", 0, 60), records("bank", 1, 60)
    full = {"a": 0}

    def run(sink, stream, tp, name):
        for i in range(0, len(stream), 2):
            while True:
                try:
                    sink.write({tp: stream[i : i + 2]})
                    break
                except OSError as exc:  # DiskFullError: rolled back, written again
                    assert exc.errno == errno.ENOSPC
                    full[name] = full.get(name, 0) + 1
            time.sleep(0.001)

    ta = threading.Thread(target=run, args=(a, shop, ("t", 0), "a"))
    tb = threading.Thread(target=run, args=(b, bank, ("t", 1), "b"))
    ta.start(), tb.start()
    ta.join(60), tb.join(60)
    assert full["a"] >= 5  # the fault happened, many times, while the other wrote
    assert file_lines(tmp_path) == expected_lines(shop, bank)  # nothing cut, torn or doubled


def test_a_peer_dead_in_the_middle_of_an_append_is_undone_before_the_next_append(tmp_path):
    def dying_write(fd, data):
        os.write(fd, bytes(data[:50]))  # torn: 50 bytes of the batch, then kill -9
        raise Killed

    a = make_sink(tmp_path, "a")
    b = make_sink(tmp_path, "b")
    shop, bank = records("shop", 0, 4), records("bank", 1, 2)
    a.write({("t", 0): shop[:2]})
    a.files.ops = FileOps(write=dying_write)
    with pytest.raises(Killed):
        a.write({("t", 0): shop[2:]})
    die(a)
    torn = (tmp_path / FLAT).read_bytes()
    assert not torn.endswith(b"\n")  # the fault is real: a torn line at the end of the file
    b.write({("t", 1): bank})  # b owns partition 1 and never ran recovery for a's partition
    after_b = (tmp_path / FLAT).read_bytes()
    assert file_lines(tmp_path) == expected_lines(shop[:2], bank)  # torn bytes gone first
    assert b.metrics.counts["recovered_intents"] == 1
    # later, a consumer taking partition 0 resumes it: b's lines stay, a's batch is read again
    c = make_sink(tmp_path, "c")
    assert c.assign([("t", 0)]) == {("t", 0): 2}
    assert (tmp_path / FLAT).read_bytes() == after_b
    c.write({("t", 0): shop[2:]})
    assert file_lines(tmp_path) == expected_lines(shop, bank)


def test_a_stalled_owner_fences_the_new_owner_until_it_lets_go(tmp_path):
    tp = ("t", 0)
    shop = records("shop", 0, 6)
    old = make_sink(tmp_path, "old")
    old.write({tp: shop[:2]})
    new = make_sink(tmp_path, "new")
    resumed = {}
    taker = threading.Thread(target=lambda: resumed.update(new.assign([tp])))
    taker.start()
    time.sleep(0.3)
    assert taker.is_alive()  # the new owner waits: the old one still holds the partition
    old.write({tp: shop[2:4]})  # the stalled owner's last batch (polled before it was kicked out)
    old.revoke([tp])
    taker.join(10)
    assert resumed == {tp: 4}  # the new owner's state includes the old owner's last batch
    new.write({tp: shop[4:]})
    # the old owner, still holding stale records of the partition, can write nothing for it
    assert old.write({tp: shop[2:4]}) == {}
    assert old.metrics.counts["unowned_records"] == 2
    assert file_lines(tmp_path) == expected_lines(shop)
    assert new.journal.load("t", 0).next_offset == 6

"""Retention against a consumer that still writes an old day (a multi-day backlog catching up).

Before the day lock, `--compress-after` compressed and unlinked a day file the consumer still
had open; the consumer went on appending to the unlinked inode and committed: lines gone.
"""

import datetime as dt
import gzip
import os
import threading
import time
from collections import namedtuple
from zoneinfo import ZoneInfo

from consumer_support import ANY_TIME

from keplerlog import daylock
from keplerlog.consumer.files import FileCache
from keplerlog.consumer.journal import Journal
from keplerlog.consumer.metrics import Metrics
from keplerlog.consumer.route import Router
from keplerlog.consumer.sink import Sink
from keplerlog.layout import Layout
from keplerlog.paths import PathGuard
from keplerlog.prune.retention import compress, run
from keplerlog.record import Batch

Rec = namedtuple("Rec", "topic partition offset timestamp headers value")
OLD_DAY = 1_700_000_000_000  # 2023-11-14
LATER = dt.date(2023, 11, 20)  # for prune: 2023-11-14 is 6 days old
LAYOUT = Layout("{service}/{module}.{day}")
TP = ("t", 0)
REL = "shop/portal.20231114"


def make_sink(root):
    router = Router(LAYOUT, ZoneInfo("UTC"), PathGuard(str(root)), ts_window=ANY_TIME)
    return Sink(router, FileCache(str(root), 16, 60), Journal(str(root), "w"), Metrics())


def rec(kafka_offset, offset, value):
    b = Batch("shop", "portal", "h1", "/app/portal.log", "f1", offset, 1, OLD_DAY)
    return Rec("t", 0, kafka_offset, OLD_DAY, b.headers(), value)


def all_lines(root):
    plain = root / REL
    gz = root / (REL + ".gz")
    data = gzip.decompress(gz.read_bytes()) if gz.exists() else b""
    return data + (plain.read_bytes() if plain.exists() else b"")


def test_prune_skips_a_day_file_a_consumer_holds_open(tmp_path):
    sink = make_sink(tmp_path)
    sink.write({TP: [rec(0, 0, b"one\n")]})
    report = run(str(tmp_path), LAYOUT, 3, now=LATER, compress_after=1)  # due for deletion
    assert (report.busy, report.deleted, report.compressed) == (1, 0, 0)
    report = run(str(tmp_path), LAYOUT, 30, now=LATER, compress_after=1)  # due for compression
    assert (report.busy, report.compressed) == (1, 0)
    sink.write({TP: [rec(1, 4, b"two\n")]})  # still catching up: appended to the live file
    assert (tmp_path / REL).read_bytes() == b"one\ntwo\n"
    sink.files.close_all()  # idle_close_s passed: the consumer let go of the file
    report = run(str(tmp_path), LAYOUT, 30, now=LATER, compress_after=1)
    assert (report.busy, report.compressed) == (0, 1) and not (tmp_path / REL).exists()
    sink.write({TP: [rec(2, 8, b"three\n")]})  # a late line: a new plain file next to the .gz
    assert all_lines(tmp_path) == b"one\ntwo\nthree\n"


def test_a_consumer_opening_while_prune_compresses_writes_to_a_live_file(tmp_path):
    """Prune holds the exclusive lock; the consumer opens the file, waits, sees it was unlinked,
    and opens (creates) it again instead of appending to the removed inode."""
    sink = make_sink(tmp_path)
    sink.write({TP: [rec(0, 0, b"one\n")]})
    sink.files.close_all()
    full = str(tmp_path / REL)
    lock = daylock.try_lock_exclusive(full)
    assert lock is not None
    done = threading.Event()

    def late_line():
        sink.write({TP: [rec(1, 4, b"late\n")]})
        done.set()

    writer = threading.Thread(target=late_line)
    writer.start()
    time.sleep(0.3)
    assert not done.is_set()  # the fault is real: the consumer waits on the lock
    compress(full, "gzip")  # unlinks the plain file under the lock, as run() does

    os.close(lock)
    writer.join(10)
    assert done.is_set()
    assert all_lines(tmp_path) == b"one\nlate\n"  # nothing in a removed inode
    assert (tmp_path / REL).read_bytes() == b"late\n"


def test_retention_takes_the_lock_only_when_no_writer_has_it(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")

    fd = os.open(path, os.O_RDWR)
    assert daylock.lock_shared(fd, str(path))
    assert daylock.try_lock_exclusive(str(path)) is None
    os.close(fd)
    ex = daylock.try_lock_exclusive(str(path))
    assert ex is not None
    os.close(ex)

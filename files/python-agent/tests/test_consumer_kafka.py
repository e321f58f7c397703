"""Consumer against a real broker, run in-process: layout, day split, legacy, attacks, dedup."""

import errno
import json
import os
import subprocess
import threading
import time
import urllib.request

import pytest
from kafka import KafkaProducer

from keplerlog.consumer.app import ConsumerApp
from keplerlog.consumer.files import FileOps
from keplerlog.consumer.journal import Journal
from keplerlog.kafkaauth import CLIENTS
from keplerlog.layout import Layout
from keplerlog.record import Batch
from keplerlog.testing.consumer import consumer_config
from keplerlog.testing.kafka_node import free_port

pytestmark = pytest.mark.kafka
DAY1 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC, 2023-11-15 in Tokyo
DAY2 = DAY1 + 86_400_000


@pytest.fixture(autouse=True, params=CLIENTS)
def client(request, monkeypatch):
    """Every test here runs with both Kafka clients the consumer offers (consumer/rdclient.py)."""
    monkeypatch.setattr(request.module, "CLIENT", request.param)
    return request.param


CLIENT = "kafka-python"


def config(kafka, topic, root, **kw):
    # The fixed 2023 timestamps are years old: a wide window keeps them on their own days.
    return consumer_config(
        kafka.bootstrap, topic, root, **{"ts_max_age_days": 100_000, "client": CLIENT, **kw}
    )


def send(kafka, topic, items):
    """items: (Batch, value) for kepler-log records, or (key, headers, value, ts) raw tuples."""
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=5)
    for item in items:
        if isinstance(item[0], Batch):
            b, value = item
            producer.send(topic, value, key=b.key(), headers=b.headers())
        else:
            key, headers, value, ts = item
            producer.send(topic, value, key=key, headers=headers or [], timestamp_ms=ts)
    producer.flush()
    producer.close()


def mk(offset, value, ts=DAY1, service="shop", module="portal", file_id="f1"):
    return Batch(service, module, "h1", "/app/portal.log", file_id, offset, value.count(b"\n"), ts), value


class Running:
    """ConsumerApp in a thread; stop() joins it."""

    def __init__(self, cfg, ops=None, sleep=time.sleep):
        self.app = ConsumerApp(cfg, ops=ops, sleep=sleep)
        self.thread = threading.Thread(target=self.app.run, daemon=True)
        self.thread.start()

    def wait(self, predicate, timeout=40):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.app.metrics.counts):
                return
            time.sleep(0.1)
        raise AssertionError(f"timeout; counts={dict(self.app.metrics.counts)}")

    def stop(self):
        self.app.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()


def files_under(root):
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and ".keplerlog" not in p.parts
    }


def test_day_split_flat_layout_timezone_and_legacy(kafka, topic, tmp_path):
    root = tmp_path / "root"
    items = [
        mk(0, b"a1\na2\n"),
        mk(6, b"b1\n", ts=DAY2),
        mk(0, b"w\n", module="web", file_id="f2"),
        (b"shop/portal", [], b"portal##$$##legacy one\nbilling##$$##legacy two\nno prefix\n", DAY1),
        (b"shop/portal", None, b"portal##$$##flume event", DAY2),
    ]  # same partition: ordered
    send(kafka, topic, items)
    run = Running(config(kafka, topic, root, layout=Layout("{module}.{day}"), timezone="Asia/Tokyo"))
    try:
        run.wait(lambda c: c["records"] >= 5)
    finally:
        run.stop()
    assert files_under(root) == {
        "portal.20231115": b"a1\na2\n" + b"legacy one\n",
        "portal.20231116": b"b1\n" + b"flume event\n",
        "web.20231115": b"w\n",
        "billing.20231115": b"legacy two\n",
        "default.20231115": b"no prefix\n",
    }
    assert run.app.metrics.counts["legacy_records"] == 2


def test_default_layout_and_replay_dedup(kafka, topic, tmp_path):
    root = tmp_path / "root"
    first = [mk(0, b"1\n2\n"), mk(4, b"3\n")]
    send(kafka, topic, first + first + [mk(2, b"2\n3\n4\n")])  # exact replay, then an overlap
    port = free_port()
    run = Running(config(kafka, topic, root, metrics_port=port))
    try:
        run.wait(lambda c: c["records"] + c["duplicate_records"] >= 5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            scraped = resp.read().decode()
        assert "keplerlog_consumer_duplicate_records_total 2.0" in scraped
        send(kafka, topic, [mk(20, b"9\n")])  # a gap of 12 bytes
        run.wait(lambda c: c["gaps"] >= 1)
    finally:
        run.stop()
    assert files_under(root) == {"shop/portal.20231114": b"1\n2\n3\n4\n9\n"}
    counts = run.app.metrics.counts
    assert counts["duplicate_records"] == 2 and counts["partial_overlaps"] == 1 and counts["gap_bytes"] == 12
    text = run.app.metrics.render()
    assert "keplerlog_consumer_duplicate_records_total 2.0" in text
    assert 'keplerlog_consumer_written_bytes_total{module="portal",service="shop"} 10.0' in text


def test_path_attacks_and_garbage_go_to_quarantine(kafka, topic, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    bad_names = ["../../etc", "/abs", "a\x00b", "..", "x" * 300, "evil\x1b[2J", ".", "", "a/../../b"]
    items = [mk(0, b"pwn\n", service=n) for n in bad_names] + [mk(0, b"pwn\n", module=n) for n in bad_names]
    ok = mk(0, b"fine\n")
    v1 = ok[0].headers()
    items += [
        (b"k", [("kl.v", b"7"), *v1[1:]], b"future\n", DAY1),  # bad version
        (b"k", [(k, b"12x" if k == "kl.offset" else v) for k, v in v1], b"x\n", DAY1),  # bad number
        (b"k", [(k, b"-5" if k == "kl.ts" else v) for k, v in v1], b"x\n", DAY1),  # negative ts
        (b"k", [("kl.v", b"1")], b"x\n", DAY1),  # missing labels
        (b"k", [], b"../../etc##$$##legacy attack\n", DAY1),  # legacy path attack
        (b"k", [(k, b"h" * 10_000 if k == "kl.host" else v) for k, v in v1], b"x\n", DAY1),  # huge label
        ok,
    ]
    garbage = (b"k", [], b"\x00\xffgarbage without prefix", DAY1)  # no headers: legacy, default module
    send(kafka, topic, [*items, garbage])
    run = Running(config(kafka, topic, root))
    try:
        run.wait(lambda c: c["records"] >= 2 and c["quarantined"] >= len(items) - 1)
    finally:
        run.stop()
    after = sorted(str(p) for p in tmp_path.rglob("*") if not str(p).startswith(str(root) + "/"))
    assert after == before  # nothing created outside the root
    files = files_under(root)
    assert files.pop("shop/portal.20231114") == b"fine\n"
    assert files.pop("legacy/default.20231114") == b"\x00\xffgarbage without prefix\n"
    ((qname, qdata),) = files.items()
    assert qname.startswith("_quarantine/")
    assert qdata.count(b"#kl-quarantine reason=") == len(items) - 1
    assert b"header kl.host longer than 253 bytes" in qdata
    too_long = sum(len(n.encode()) > 100 for n in bad_names)  # rejected earlier, by the label limit
    assert run.app.metrics.counts["unsafe_names"] == 2 * (len(bad_names) - too_long) + 1
    assert qdata.count(b"header kl.service longer than 100 bytes") == too_long


def test_disk_full_pauses_and_retries_without_loss(kafka, topic, tmp_path):
    root = tmp_path / "root"
    state = {"fail": 3}

    def write(fd, data):
        if state["fail"] > 0:
            state["fail"] -= 1
            os.write(fd, bytes(data[:3]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    send(kafka, topic, [mk(0, b"l1\nl2\n"), mk(6, b"l3\n")])
    run = Running(config(kafka, topic, root), ops=FileOps(write=write), sleep=lambda s: time.sleep(0.05))
    try:
        run.wait(lambda c: c["records"] >= 2)
    finally:
        run.stop()
    assert run.app.metrics.counts["disk_full"] == 3
    assert files_under(root) == {"shop/portal.20231114": b"l1\nl2\nl3\n"}


def test_a_full_disk_when_the_state_is_written_pauses_and_writes_each_line_once(
    kafka, topic, tmp_path, monkeypatch
):
    """ENOSPC after the lines are durable, when the batch's state files are written (the e2e
    tmpfs hit it there): the consumer must show it paused and count it like any full disk,
    keep its group membership, and write the batch once. It used to retry unseen in the
    writer thread: no pause gauge, no count, no poll for as long as the disk stayed full."""
    real = Journal.save_states
    refused = {"left": 4, "seen": 0}

    def save_states(self, states):
        if refused["left"] > 0:
            refused["left"] -= 1
            refused["seen"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, states)

    monkeypatch.setattr(Journal, "save_states", save_states)
    root = tmp_path / "root"
    # one record per batch: while the first batch's state is refused, the next batches wait
    # (polled already, not written yet) and must be written after it, not dropped
    send(kafka, topic, [mk(0, b"l1\n"), mk(3, b"l2\n"), mk(6, b"l3\n")])
    cfg = config(kafka, topic, root, max_poll_records=1, batch_max_bytes=1)
    run = Running(cfg, sleep=lambda s: time.sleep(0.05))
    paused = []
    try:
        deadline = time.monotonic() + 40
        while refused["left"] and time.monotonic() < deadline:
            paused.append(run.app.metrics.gauges["disk_full_paused"])
            time.sleep(0.005)
        send(kafka, topic, [mk(9, b"l4\n")])  # after the disk came back
        run.wait(lambda c: c["records"] >= 4)
        run.wait(lambda c: 4 in run.app._committed.values())  # committed past all four
    finally:
        run.stop()
    assert refused["seen"] == 4 and 1 in paused  # the fault happened, and it showed
    assert run.app.metrics.counts["disk_full"] == 4
    assert run.app.metrics.gauges["disk_full_paused"] == 0
    assert files_under(root) == {"shop/portal.20231114": b"l1\nl2\nl3\nl4\n"}  # once each
    assert run.app.metrics.counts["gaps"] == 0


def produce_raw_headers(kafka, topic, key: bytes, headers: list[bytes], value: bytes) -> None:
    """Produce with kcat, which writes header keys as given bytes (kafka-python cannot)."""
    args = [
        b"kcat",
        b"-P",
        b"-b",
        kafka.bootstrap.encode(),
        b"-t",
        topic.encode(),
        b"-k",
        key,
        b"-D",
        b"\x1e",
    ]
    for header in headers:
        args += [b"-H", header]
    subprocess.run(args, input=value + b"\x1e", check=True, timeout=30)  # \x1e ends the message


def test_header_key_that_is_not_utf8_is_no_poison_pill(kafka, topic, tmp_path):
    """Such a key made poll() raise CorruptRecordError, then hang; a restart read it again.
    With librdkafka it left an error pending that surfaced as a SystemError out of poll()."""
    root = tmp_path / "root"
    first, after = mk(0, b"before\n"), mk(7, b"after\n")
    send(kafka, topic, [first])
    good = [f"{k}={v.decode()}".encode() for k, v in mk(20, b"x\n", file_id="f2")[0].headers()]
    # our labels plus a foreign key that is not UTF-8: written as usual
    produce_raw_headers(kafka, topic, b"shop/portal", [*good, b"trace\xff\xfeid=1"], b"labelled\n")
    # only foreign keys that are not UTF-8 (no kl.v): a legacy line
    produce_raw_headers(kafka, topic, b"shop/portal", [b"\xc3\x28=x", b"\xff=y"], b"bare\n")
    send(kafka, topic, [after])
    run = Running(config(kafka, topic, root))
    try:
        run.wait(lambda c: c["records"] >= 4)
        assert run.thread.is_alive()
    finally:
        run.stop()
    files = files_under(root)
    lines = files["shop/portal.20231114"].splitlines(keepends=True)  # kcat's partitioner differs
    legacy = {name: data for name, data in files.items() if name.startswith("legacy/default.")}
    legacy_lines = sorted(b"".join(legacy.values()).splitlines(keepends=True))  # dated today
    if CLIENT == "kafka-python":  # the bad bytes replaced: its labels still read
        assert sorted(lines) == [b"after\n", b"before\n", b"labelled\n"]
        assert legacy_lines == [b"bare\n"]
    else:  # librdkafka cannot decode any of its headers (rdclient.py): written, as a legacy line
        assert sorted(lines) == [b"after\n", b"before\n"]
        assert legacy_lines == [b"bare\n", b"labelled\n"]
    assert run.app.metrics.counts["replaced_header_keys"] == 2
    assert run.app.metrics.counts["quarantined"] == 0


@pytest.fixture
def small_fs(tmp_path):
    """A real 1 MiB file system (tmpfs) as the consumer's data root; needs root, as CI has."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=200", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_disk_pauses_commits_nothing_and_resumes_when_freed(kafka, topic, small_fs):
    """Fill a real file system under load: no torn line, nothing committed past the disk, then
    every line exactly once after space is freed (the consumer resumes by itself)."""
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (600 * 1024))  # leaves ~400 KiB for 800 KiB of lines
    items, offset = [], 0
    for n in range(400):
        value = b"".join(f"seq={n * 4 + i:05d} {'d' * 490}\n".encode() for i in range(4))  # 2 KiB
        items.append(mk(offset, value))
        offset += len(value)
    send(kafka, topic, items)
    run = Running(config(kafka, topic, small_fs, batch_max_bytes=32 * 1024, max_poll_records=16))
    day = small_fs / "shop" / "portal.20231114"
    try:
        run.wait(lambda c: c["disk_full"] >= 2, timeout=60)  # the fault happened, for real
        assert run.app.metrics.gauges["disk_full_paused"] == 1  # exported while it lasts
        on_disk = day.read_bytes()
        assert on_disk.endswith(b"\n") and len(on_disk) < offset  # whole lines only, not all yet
        assert all(len(line) == 501 for line in on_disk.splitlines(keepends=True))
        states = [
            json.loads(p.read_text()) for p in (small_fs / ".keplerlog/state").glob("*-partition-*.json")
        ]
        (written,) = [st["files"]["shop\x1fh1\x1ff1"] for st in states if st["files"]]
        assert written[1:] == [0, len(on_disk)]  # the durable state is exactly what is on disk
        filler.unlink()  # free the space (what the retention job does)
        run.wait(lambda c: c["bytes"] >= offset and run.app.metrics.gauges["disk_full_paused"] == 0, 90)
    finally:
        run.stop()
    data = day.read_bytes()
    seqs = [int(line[4:9]) for line in data.splitlines()]
    assert sorted(seqs) == list(range(1600)) and len(data) == offset  # each line once, none torn
    assert run.app.metrics.counts["disk_full"] >= 2


def test_a_backlog_eight_times_the_prefetch_is_written_once_each(kafka, topic, tmp_path):
    """Past the client's caps: 1 MiB fetches and batches of 256 KiB (librdkafka's queue of
    fetched records then holds 1 MiB, rdclient.py) against 9.7 MB waiting in the topic. The
    queue fills again and again (librdkafka pauses its fetcher each time, 10 ms); every line
    must land once, in order per file."""
    root = tmp_path / "root"
    items, expected, offset = [], bytearray(), 0
    for n in range(300):
        value = b"".join(f"seq={n * 32 + i:06d} {'q' * 1000}\n".encode() for i in range(32))  # ~32 KB
        items.append(mk(offset, value))
        expected += value
        offset += len(value)
    send(kafka, topic, items)
    cfg = config(
        kafka,
        topic,
        root,
        fetch_max_bytes=1 << 20,
        max_partition_fetch_bytes=1 << 20,
        batch_max_bytes=256 << 10,
    )
    if CLIENT == "librdkafka":
        from keplerlog.consumer.rdclient import rdkafka_conf

        queued = rdkafka_conf(cfg, print, print)["queued.max.messages.kbytes"] * 1024
        assert len(expected) >= 8 * queued  # the backlog really is past the cap
    run = Running(cfg)
    try:
        run.wait(lambda c: c["records"] >= 300, timeout=120)
    finally:
        run.stop()
    assert files_under(root) == {"shop/portal.20231114": bytes(expected)}
    counts = run.app.metrics.counts
    # a batch ends past 256 KiB, so at most that plus one poll (one 1 MiB fetch): >= 9.7 / 1.31
    assert counts["batches"] >= 7
    assert counts["duplicate_records"] == 0 and counts["gaps"] == 0

"""Agent -> real Kafka -> consumer: a very long line next to a busy file of the same module.

Both files feed one day file. Before whole-line assembly the long line's pieces (one record
each) were interleaved with the busy file's records and application lines were glued onto
them. Here every line of the day file must be a whole source line, each exactly once; past the
consumer's `lines.max_line_bytes` the line comes as marked pieces that join to it exactly.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
from agent_support import AgentProcess, write_config

from keplerlog.consumer.app import ConsumerApp
from keplerlog.consumer.lines import MARKER, LinePolicy
from keplerlog.testing.consumer import consumer_config

pytestmark = pytest.mark.kafka
MiB = 1024 * 1024
BUSY = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} DEBUG busy \d+ x+\n$")


def busy_writer(path, stop: threading.Event, written: list[bytes]) -> None:
    """An application logging ~1,000 lines/s into the other file of the module."""
    with open(path, "ab", buffering=0) as f:
        n = 0
        while not stop.is_set():
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            line = f"{stamp},{n % 1000:03d} DEBUG busy {n} {'x' * 80}\n".encode()
            f.write(line)
            written.append(line)
            n += 1
            if n % 10 == 0:
                time.sleep(0.01)


def consumer(kafka, topic, root, cap):
    return ConsumerApp(consumer_config(kafka.bootstrap, topic, root, lines=LinePolicy(max_line_bytes=cap)))


@pytest.mark.parametrize(("size_mib", "cap_mib"), [(10, 16), (100, 16)])
def test_long_line_next_to_a_busy_file_arrives_whole(tmp_path, kafka, topic, logdir, size_mib, cap_mib):
    long_path, busy_path = logdir / "portal.log", logdir / "portal-busy.log"
    long_path.write_bytes(b"")
    busy_path.write_bytes(b"")
    cfg = write_config(tmp_path, kafka.bootstrap, topic, [str(logdir / "*.log")])
    agent = AgentProcess(cfg, tmp_path / "agent.out").start()
    root = tmp_path / "central"
    app = consumer(kafka, topic, root, cap_mib * MiB)
    runner = threading.Thread(target=app.run, daemon=True)
    runner.start()
    stop, busy = threading.Event(), []
    writer = threading.Thread(target=busy_writer, args=(busy_path, stop, busy), daemon=True)
    writer.start()
    # the long line: written slowly, 1 MiB at a time, while the busy file keeps logging
    body = bytes(range(ord("a"), ord("z") + 1)) * (size_mib * MiB // 26)
    long_line = b"2026-12-02 12:00:00,000 INFO big " + body + b"\n"
    with open(long_path, "ab", buffering=0) as f:
        for i in range(0, len(long_line), MiB):
            f.write(long_line[i : i + MiB])
            time.sleep(0.05)
        f.write(b"2026-12-02 12:00:01,000 INFO after the big one\n")
    time.sleep(1)
    stop.set()
    writer.join()
    day_files = []
    try:
        deadline = time.monotonic() + 180
        expected = len(long_line) + sum(map(len, busy)) + 47
        while time.monotonic() < deadline:
            day_files = list(root.glob("shop/portal.*"))
            size = sum(p.stat().st_size for p in day_files)
            if size >= expected:
                break
            time.sleep(0.5)
    finally:
        app.stop()
        runner.join(60)
        assert agent.stop() == 0, agent.output()
    data = b"".join(p.read_bytes() for p in sorted(day_files))
    lines = data.splitlines(keepends=True)
    # the fault was real: the line came in many records, with the busy file's records between
    assert app.metrics.counts["lines_joined"] >= 1
    marked = [line for line in lines if line.endswith(MARKER)]
    plain_long = [
        line for line in lines if not BUSY.match(line) and line not in marked and b"after the big" not in line
    ]
    busy_out = [line for line in lines if BUSY.match(line)]
    assert sorted(busy_out) == sorted(busy)  # every busy line whole, once
    assert lines.count(b"2026-12-02 12:00:01,000 INFO after the big one\n") == 1
    if len(long_line) < cap_mib * MiB:
        assert marked == [] and plain_long == [long_line]
    else:
        assert len(plain_long) == 1 and len(marked) >= len(long_line) // (cap_mib * MiB + MiB)
        # pieces are in file order in the day file (one partition, one source)
        assert b"".join(m[: -len(MARKER)] for m in marked) + plain_long[0] == long_line
        assert app.metrics.counts["lines_cut"] == len(marked)
    assert len(lines) == len(busy) + 1 + len(marked) + 1  # nothing else in the file
    assert app.metrics.counts["newlines_added"] == 0

"""Fast agent unit tests: no broker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from keplerlog import lazyinit
from keplerlog.agent import checkpoint
from keplerlog.agent.acks import AckTracker
from keplerlog.agent.assembler import DAY_S, Assembler
from keplerlog.agent.config import (
    LINGER_MS_BATCHED,
    LINGER_MS_ONE_LINE_PER_RECORD,
    ConfigError,
    Multiline,
    load,
    parse,
)
from keplerlog.agent.identity import FINGERPRINT_BYTES, Fingerprint, TailMark
from keplerlog.agent.metrics import AgentMetrics, Counters, FileGauge, Snapshot
from keplerlog.agent.tailer import AssemblerSettings, TailedFile
from keplerlog.agent.watch import Waker, Watcher

BASE = {
    "service": "shop",
    "state_file": "/var/lib/keplerlog/state.json",
    "inputs": [{"paths": ["/app/logs/*.log"]}],
}


def _cfg(**over):
    return parse({**BASE, **over}, env={})


# -- config ----------------------------------------------------------------------------------


def test_config_defaults_and_example_from_interfaces():
    doc = {
        "service": "shop",
        "module": "portal",
        "host": "",
        "kafka": {
            "bootstrap_servers": "kafka-1:9092,kafka-2:9092",
            "topic": "keplerlog",
            "compression": "lz4",
            "max_record_bytes": 900000,
        },
        "state_file": "/var/lib/keplerlog/agent-state.json",
        "inputs": [
            {
                "paths": ["/app/portal/logs/*.log"],
                "module": "portal",
                "multiline": {"start": r"^\d{4}-\d{2}-\d{2}", "max_lines": 500, "timeout_ms": 1000},
            }
        ],
        "limits": {"max_buffer_bytes": 3145728, "max_line_bytes": 65536},
        "metrics": {"port": 0, "log_interval_s": 60},
    }
    cfg = parse(doc, env={})
    assert cfg.host  # defaults to the host name
    assert cfg.inputs[0].multiline is not None
    assert cfg.inputs[0].multiline.start.match(b"2024-01-01 x")
    assert cfg.kafka.compression == "lz4" and cfg.kafka.linger_ms == 0
    assert cfg.limits.max_buffer_bytes == _cfg().limits.max_buffer_bytes == 3 * 1024 * 1024
    assert _cfg().module == "shop"


@pytest.mark.parametrize(
    "over, linger",
    [
        ({}, LINGER_MS_BATCHED),  # the agent packs lines into records: no producer linger
        ({"one_line_per_record": True}, LINGER_MS_ONE_LINE_PER_RECORD),
        # one input in per-line mode is enough: there is one producer for all inputs
        (
            {"inputs": [{"paths": ["/a/*.log"]}, {"paths": ["/b/*.log"], "one_line_per_record": True}]},
            LINGER_MS_ONE_LINE_PER_RECORD,
        ),
        ({"one_line_per_record": True, "inputs": [{"paths": ["/a/*.log"], "one_line_per_record": False}]}, 0),
        ({"kafka": {"linger_ms": None}, "one_line_per_record": True}, LINGER_MS_ONE_LINE_PER_RECORD),
        # an explicit value always wins, in both modes, 0 included
        ({"kafka": {"linger_ms": 7}}, 7),
        ({"kafka": {"linger_ms": 0}, "one_line_per_record": True}, 0),
        ({"kafka": {"linger_ms": 50}, "one_line_per_record": False}, 50),
    ],
)
def test_linger_default_depends_on_mode(over, linger):
    assert (LINGER_MS_BATCHED, LINGER_MS_ONE_LINE_PER_RECORD) == (0, 20)
    assert _cfg(**over).kafka.linger_ms == linger


def test_linger_env_overrides_keep_mode_default():
    env = {"KEPLERLOG_BOOTSTRAP_SERVERS": "k9:9092", "KEPLERLOG_INPUTS": "/x/*.log"}
    assert parse({**BASE, "one_line_per_record": True}, env=env).kafka.linger_ms == 20
    assert parse(BASE, env=env).kafka.linger_ms == 0
    with pytest.raises(ConfigError, match=r"kafka\.linger_ms"):
        _cfg(kafka={"linger_ms": -1})


def test_the_read_paths_buffers_stay_below_the_mmap_threshold():
    """A 256 KiB read, the record joined from it with a held line, and the producer's copy of it
    are reused from the heap only while they are under glibc's mmap threshold (memory.py)."""
    from keplerlog.agent import memory, tailer

    assert memory.MMAP_THRESHOLD >= tailer.READ_CHUNK + 64 * 1024


# In a fresh interpreter: a read-sized buffer made and freed 200 times, on the main thread and on
# a second one (each has its own arena); prints the minor page faults per buffer of each. argv[1]
# is the trim threshold: the agent's, or glibc's 128 KiB default that the mmap threshold alone
# leaves in place (the settings before TRIM_THRESHOLD).
_READ_CYCLE_FAULTS = """
import resource, sys, threading
from keplerlog.agent import memory, tailer
tuned = memory.tune_malloc(trim_threshold=int(sys.argv[1]))
def faults(who):
    for _ in range(20):  # the heap grows to its working size first
        buf = b"x" * tailer.READ_CHUNK
        del buf
    before = resource.getrusage(who).ru_minflt
    for _ in range(200):
        buf = b"x" * tailer.READ_CHUNK
        del buf
    return (resource.getrusage(who).ru_minflt - before) / 200
out = [faults(resource.RUSAGE_SELF)]
thread = threading.Thread(target=lambda: out.append(faults(resource.RUSAGE_THREAD)))
thread.start()
thread.join()
print(tuned, *out)
"""


def test_a_freed_read_buffer_stays_mapped_for_the_next_read():
    """Past glibc's default trim threshold (128 KiB), freeing a 512 KiB read at a heap's top
    hands its pages back and the next read faults every one in again (96 faults per read with
    the mmap threshold alone). With memory.TRIM_THRESHOLD the pages stay: the measurement
    checks the fault first (the untuned run pays it), then that the tuned run does not."""
    from keplerlog.agent import memory, tailer

    assert memory.TRIM_THRESHOLD >= 2 * tailer.READ_CHUNK
    pages = tailer.READ_CHUNK // 4096

    def run(trim_threshold: int) -> list[float]:
        cmd = [sys.executable, "-c", _READ_CYCLE_FAULTS, str(trim_threshold)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        tuned, *faults = out.stdout.split()
        assert tuned == "True", "mallopt not applied"
        return [float(f) for f in faults]

    baseline = run(128 * 1024)
    tuned = run(memory.TRIM_THRESHOLD)
    assert all(f >= pages / 2 for f in baseline), f"no refaults to prevent: {baseline}"
    assert all(f < 4 for f in tuned), f"faults per read with the agent's malloc settings: {tuned}"


def test_defer_package_init_runs_init_on_first_lookup(tmp_path, monkeypatch):
    pkg = tmp_path / "klpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import klpkg.heavy\nVALUE = klpkg.heavy.X\n")
    (pkg / "heavy.py").write_text("X = 42\n")
    (pkg / "light.py").write_text("Y = 1\n")
    (pkg / "deep.py").write_text("W = 5\n")
    (pkg / "other.py").write_text("from . import deep\nZ = deep.W + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("klpkg", "klpkg.heavy", "klpkg.light", "klpkg.deep", "klpkg.other"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert lazyinit.defer_package_init("klpkg")
    assert not lazyinit.defer_package_init("klpkg")  # already registered: left alone
    from klpkg.light import Y

    assert Y == 1 and lazyinit.deferred("klpkg") and "klpkg.heavy" not in sys.modules
    from klpkg import other  # a submodule asked of the package (`from . import` inside it too)

    assert other.Z == 6 and lazyinit.deferred("klpkg") and "klpkg.heavy" not in sys.modules
    from klpkg import VALUE  # a name of the package itself: __init__ runs now

    assert VALUE == 42 and not lazyinit.deferred("klpkg")
    import klpkg

    with pytest.raises(AttributeError):
        _ = klpkg.missing


def test_config_env_overrides():
    env = {
        "KEPLERLOG_BOOTSTRAP_SERVERS": "k9:9092",
        "KEPLERLOG_TOPIC": "other",
        "KEPLERLOG_SERVICE": "svc",
        "KEPLERLOG_MODULE": "mod",
        "KEPLERLOG_HOST": "h1",
        "KEPLERLOG_INPUTS": "/x/*.log, /y/a.log",
        "KEPLERLOG_STATE_FILE": "/var/lib/k/s.json",
        "KEPLERLOG_METRICS_PORT": "9311",
        "KEPLERLOG_METRICS_HOST": "0.0.0.0",
        "KEPLERLOG_WATERMARK_INTERVAL_S": "5",
    }
    cfg = parse(BASE, env=env)
    assert (cfg.metrics.host, cfg.watermarks.interval_s) == ("0.0.0.0", 5)
    assert parse(BASE, env={"KEPLERLOG_WATERMARK_INTERVAL_S": "0"}).watermarks.interval_s == 0
    with pytest.raises(ConfigError, match=r"watermarks\.interval_s"):
        parse(BASE, env={"KEPLERLOG_WATERMARK_INTERVAL_S": "soon"})
    assert (cfg.kafka.bootstrap_servers, cfg.kafka.topic, cfg.service, cfg.module, cfg.host) == (
        "k9:9092",
        "other",
        "svc",
        "mod",
        "h1",
    )
    assert cfg.inputs[0].paths == ("/x/*.log", "/y/a.log") and cfg.inputs[0].module == "mod"
    assert str(cfg.state_file) == "/var/lib/k/s.json" and cfg.metrics.port == 9311


@pytest.mark.parametrize(
    "over, message",
    [
        ({"service": None}, "service"),
        ({"kafka": {"compression": "snappy"}}, "kafka.compression"),
        ({"kafka": {"linger": 5}}, "unknown key"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"paths": ["relative/*.log"]}]}, "absolute"),
        ({"inputs": [{"paths": ["/a/*.log"], "multiline": {"start": "("}}]}, "regular expression"),
        ({"limits": {"max_line_bytes": "big"}}, "integer"),
        ({"limits": {"max_line_bytes": 2_000_000}}, "max_record_bytes"),
        ({"state_file": "/app/logs/state.json"}, "log directory"),
        ({"metrics": {"port": 70000}}, "metrics.port"),
    ],
)
def test_config_errors_are_one_line(over, message):
    with pytest.raises(ConfigError) as err:
        parse({**BASE, **over}, env={})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_config_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "agent.yml"
    bad.write_text("service: shop\ninputs: [\n")
    proc = subprocess.run(
        [sys.executable, "-m", "keplerlog.agent.main", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "invalid YAML" in proc.stderr
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.yml", env={})
    bad.write_text(yaml.safe_dump({**BASE, "kafka": {"topic": "bad topic"}}))
    with pytest.raises(ConfigError, match="topic"):
        load(bad, env={})


# -- assembler -------------------------------------------------------------------------------


def _asm(**kw):
    base = dict(max_record_bytes=100, max_line_bytes=20, partial_timeout_s=5.0)
    base.update(kw)
    return Assembler(0, **base)


def _check_contiguous(chunks, start=0):
    offset = start
    for c in chunks:
        assert c.offset == offset
        offset = c.end
    return offset


def test_records_cut_at_line_ends_up_to_max_record():
    a = _asm()
    data = b"".join(f"line {i:03d}\n".encode() for i in range(30))  # 9 bytes each
    chunks = a.feed(data, 1000.0, 1.0)
    assert b"".join(c.data for c in chunks) == data
    assert all(len(c.data) <= 100 and c.data.endswith(b"\n") for c in chunks)
    assert sum(c.lines for c in chunks) == 30
    assert _check_contiguous(chunks) == len(data)


def test_partial_line_held_until_newline_or_timeout():
    a = _asm()
    assert [c.data for c in a.feed(b"one\ntw", 1000.0, 1.0)] == [b"one\n"]
    assert a.held == 2 and a.read_offset == 6
    assert a.feed(b"o", 1000.0, 2.0) == []
    assert a.poll(1000.0, 5.9) == []
    assert a.next_deadline() == pytest.approx(6.0)  # timeout counts from the first held byte
    (c,) = a.poll(1000.0, 6.1)
    assert (c.offset, c.data, c.lines) == (4, b"two", 1)
    (c,) = a.feed(b" more\n", 1000.0, 7.0)
    assert (c.offset, c.data) == (7, b" more\n")


def test_overlong_line_split_into_pieces_offsets_exact():
    a = _asm()
    data = b"ab\n" + b"x" * 50 + b"\nshort\n"
    chunks = a.feed(data[:30], 1000.0, 1.0) + a.feed(data[30:], 1000.0, 1.0)
    assert b"".join(c.data for c in chunks) == data
    _check_contiguous(chunks)
    pieces = [c.data for c in chunks if not c.data.endswith(b"\n")]
    assert pieces == [b"x" * 20, b"x" * 20]  # the last 10 x's end with the newline: a normal line
    assert a.lines_split == 1


def test_nul_and_invalid_utf8_untouched():
    a = _asm(max_line_bytes=100)
    data = b"\x00\xff\xfe\n\xc3\x28\x00\n"
    assert b"".join(c.data for c in a.feed(data, 1000.0, 1.0)) == data


def test_one_line_per_record():
    a = _asm(one_line_per_record=True)
    chunks = a.feed(b"a\nbb\nccc\n", 1000.0, 1.0)
    got = [(c.offset, c.data, c.lines) for c in chunks]
    assert got == [(0, b"a\n", 1), (2, b"bb\n", 1), (5, b"ccc\n", 1)]


def test_multiline_groups_events_and_flushes_on_timeout_and_max_lines():
    ml = Multiline(start=re.compile(rb"^\d"), max_lines=3, timeout_ms=500)
    a = _asm(max_record_bytes=1000, max_line_bytes=100, multiline=ml, one_line_per_record=True)
    chunks = a.feed(b"1 err\n at a\n at b\n2 ok\n3 x\n y\n", 1000.0, 1.0)
    assert [c.data for c in chunks] == [b"1 err\n at a\n at b\n", b"2 ok\n"]
    assert a.held == len(b"3 x\n y\n")
    assert a.poll(1000.0, 1.4) == []
    (c,) = a.poll(1000.0, 1.6)
    assert (c.data, c.lines) == (b"3 x\n y\n", 2)
    chunks = a.feed(b"4\n a\n b\n c\n", 1000.0, 2.0)  # max_lines=3 closes the event
    assert [c.data for c in chunks] == [b"4\n a\n b\n"]


def test_multiline_event_of_an_idle_batched_file_ships_after_timeout():
    # Regression: with batching (not one line per record) the timed-out last event was moved
    # into the open record but the record was never closed, so an idle file kept it forever.
    ml = Multiline(start=re.compile(rb"^\d"), max_lines=100, timeout_ms=500)
    a = _asm(max_record_bytes=1000, max_line_bytes=100, multiline=ml)
    first = a.feed(b"1 a\n2 b\n at x\n", 1000.0, 1.0)
    assert b"".join(c.data for c in first) == b"1 a\n"
    assert a.poll(1000.0, 1.2) == []
    (c,) = a.poll(1000.0, 1.6)
    assert (c.offset, c.data, c.lines) == (4, b"2 b\n at x\n", 2)
    assert a.held == 0


def test_multiline_events_packed_without_splitting():
    ml = Multiline(start=re.compile(rb"^E"), max_lines=100, timeout_ms=500)
    a = _asm(max_record_bytes=30, max_line_bytes=10, multiline=ml)
    data = b"E1\n a\n b\nE2\n c\nE3\n d\n e\n f\nE4\n"
    chunks = a.feed(data, 1000.0, 1.0) + a.flush()
    assert b"".join(c.data for c in chunks) == data
    for c in chunks:  # every record starts with an event start
        assert c.data.startswith(b"E")
    _check_contiguous(chunks)


def test_records_never_span_two_days():
    a = _asm()
    day_end = 20000 * DAY_S - 0.5
    assert a.feed(b"ab\npart", day_end, 1.0)[0].data == b"ab\n"
    chunks = a.feed(b"ial\nnext\n", day_end + 1.0, 1.2)
    assert [c.data for c in chunks] == [b"part", b"ial\nnext\n"]
    assert chunks[0].ts_ms // 1000 // DAY_S != chunks[1].ts_ms // 1000 // DAY_S
    a.feed(b"held", day_end + 2.0, 1.3)
    (c,) = a.poll(day_end + 2.0 + DAY_S, 1.4)  # the held bytes leave before the next day starts filling
    assert c.data == b"held"


def test_rewind_restarts_at_offset():
    a = _asm()
    a.feed(b"abc\ndef\nxy", 1000.0, 1.0)
    a.rewind(4)
    assert a.read_offset == 4 and a.held == 0
    (c,) = a.feed(b"def\n", 1000.0, 1.0)
    assert c.offset == 4


# -- acks, identity, checkpoint --------------------------------------------------------------


def test_ack_tracker_contiguous_out_of_order_and_overlapping():
    t = AckTracker(100)
    assert not t.ack(200, 300)
    assert not t.ack(300, 400)
    assert t.acked == 100
    assert t.ack(100, 200) and t.acked == 400
    assert not t.ack(150, 250)  # a replay
    t.ack(450, 500)
    t.ack(400, 470)  # overlaps the waiting range
    assert t.acked == 500 and t.waiting == 0


def test_fingerprint_grows_and_detects_rewrite(tmp_path):
    p = tmp_path / "f.log"
    p.write_bytes(b"hello\n")
    fd = os.open(p, os.O_RDONLY)
    try:
        fp = Fingerprint.of_fd(fd)
        assert fp.length == 6 and not fp.complete
        p.write_bytes(b"hello\n" + b"x" * 5000)  # grew: still the same file
        assert fp.matches_fd(fd)
        assert Fingerprint.of_fd(fd).length == FINGERPRINT_BYTES
        p.write_bytes(b"HELLO\n" + b"x" * 5000)  # rewritten beyond the old size
        assert not fp.matches_fd(fd)
    finally:
        os.close(fd)


def _settings():
    return AssemblerSettings(max_record_bytes=1000, max_line_bytes=100, partial_timeout_s=5)


def _tail(path: Path):
    from keplerlog.agent.config import InputConfig

    fd = os.open(path, os.O_RDONLY)
    return TailedFile.open(
        str(path),
        fd,
        os.fstat(fd),
        InputConfig((str(path),), "m"),
        _settings(),
        identity=None,
        offset=0,
        mono=0.0,
    )


def test_tailed_file_detects_truncation_and_regrowth(tmp_path):
    p = tmp_path / "a.log"
    p.write_bytes(b"first line\nsecond\n")
    f = _tail(p)
    try:
        chunks, n, lines = f.read(1 << 20, 1000.0, 1.0)
        assert n == 18 and lines == 2 and chunks[0].data == p.read_bytes()
        old_id = f.stream.file_id
        with p.open("r+b") as fh:  # truncate and grow back beyond the old offset
            fh.truncate(0)
            fh.write(b"brand new content, longer than before\n")
        f.refresh(2.0)
        assert not f.size < f.read_offset
        assert f.truncated(check_fingerprint=True)
        f.restart(_settings())
        assert f.stream.file_id != old_id and f.read_offset == 0
        chunks, _, _ = f.read(1 << 20, 1000.0, 3.0)
        assert chunks[0].data == p.read_bytes()
        os.truncate(p, 5)  # plain truncation: smaller than the offset
        f.refresh(4.0)
        assert f.truncated(check_fingerprint=False)
    finally:
        f.close()


def test_deleted_file_is_detached_but_still_readable(tmp_path):
    p = tmp_path / "a.log"
    p.write_bytes(b"x\n")
    f = _tail(p)
    try:
        p.unlink()
        f.refresh(1.0)
        assert f.detached
        chunks, _, _ = f.read(100, 1000.0, 1.0)
        assert chunks[0].data == b"x\n"
    finally:
        f.close()


def test_checkpoint_atomic_round_trip_and_corrupt_file(tmp_path):
    path = tmp_path / "state" / "s.json"
    st = checkpoint.FileState("id1", "/l/a.log", 1, 2, 10, "abc", 1234)
    marked = checkpoint.FileState("id2", "/l/b.log", 1, 3, 10, "abc", 300, mark=TailMark.of(b"x" * 256, 300))
    checkpoint.save(path, [st, marked])
    assert checkpoint.load(path) == {"id1": st, "id2": marked}
    assert not list(path.parent.glob(".*tmp"))
    assert json.loads(path.read_text())["version"] == 1
    path.write_text("{not json")
    assert checkpoint.load(path) == {}
    assert checkpoint.load(tmp_path / "none.json") == {}


def test_state_file_keeps_the_rotated_copies_beside_the_files(tmp_path, caplog):
    """FileSet.copies survive a restart in the state file (the bytes json.dumps writes); a state
    file without them, or with a bad list, loads its files all the same and no copies."""
    path = tmp_path / "s.json"
    st = checkpoint.FileState("id1", "/l/a.log", 1, 2, 10, "abc", 1234)
    copies = {(1, 9): 1_700_000_000_123_456_789, (1, 3): 5}
    checkpoint.save(path, [st], copies)
    listed = [[1, 3, 5], [1, 9, 1_700_000_000_123_456_789]]
    doc = {"copies": listed, "files": {"id1": st.to_json()}, "version": 1}
    assert path.read_bytes() == json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    assert checkpoint.load(path) == {"id1": st}
    assert checkpoint.load_copies(path) == copies
    checkpoint.save(path, [st], {})  # none: the document as before copies were kept
    assert "copies" not in json.loads(path.read_text())
    assert checkpoint.load_copies(path) == {}
    assert checkpoint.load_copies(tmp_path / "none.json") == {}
    for bad in ("[[1, 2]]", '[["x", 2, 3]]', '{"a": 1}', "7"):
        path.write_text(f'{{"copies":{bad},"files":{{"id1":{json.dumps(st.to_json())}}},"version":1}}')
        assert checkpoint.load(path) == {"id1": st}
        assert checkpoint.load_copies(path) == {}
    assert "rotated copies unreadable" in caplog.text


def test_state_file_reencodes_only_changed_entries_and_writes_what_json_dumps_wrote(tmp_path):
    """The state file's bytes stay those of json.dumps of the whole document (sorted keys,
    compact), while a checkpoint encodes only the entries whose state changed."""
    import dataclasses

    dumps = json.dumps  # bound before the count below replaces it

    def reference(states):
        doc = {"version": 1, "files": {s.file_id: s.to_json() for s in states}}
        return dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    states = [
        checkpoint.FileState(f"id{i:03d}", f"/l/ä{i}.log", 1, i, 10, "abc", i * 7, seen=i * 9, module="m")
        for i in range(300, 0, -1)  # not in id order
    ]
    mark = TailMark.of(b"y" * 256, 300)
    odd = checkpoint.FileState('x"q', "/l/\u2028.log", 1, 9, 10, "abc", 300, mark=mark)
    states.append(odd)
    writer = checkpoint.StateFile(tmp_path / "s.json")
    assert writer.encode(states) == reference(states)
    encoded = []
    real_dumps = checkpoint.json.dumps
    checkpoint.json.dumps = lambda *a, **k: encoded.append(a) or real_dumps(*a, **k)
    try:
        # unchanged, or an equal copy (the file set replaces closed states): nothing encoded
        copies = [dataclasses.replace(s) for s in states]
        assert writer.encode(copies) == reference(states) and not encoded
        # an offset, a `seen` alone (not compared by ==), a forgotten file, a new file
        changed = list(copies)
        changed[0] = dataclasses.replace(changed[0], offset=changed[0].offset + 1)
        changed[1] = dataclasses.replace(changed[1], seen=10**9)
        del changed[2]
        changed.append(checkpoint.FileState("new", "/l/new.log", 1, 999, 10, "abc", 1))
        assert writer.encode(changed) == reference(changed)
        assert len(encoded) == 2 * 3  # key and body of the three changed or new entries
    finally:
        checkpoint.json.dumps = real_dumps
    writer.save(changed)
    assert checkpoint.load(tmp_path / "s.json") == {s.file_id: s for s in changed}


def test_state_file_bytes_stay_those_of_json_dumps_through_any_sequence_of_changes(tmp_path):
    """Changed entries replace their bytes in place while the set of ids is the same; a new
    or a forgotten id re-sorts. 300 random checkpoints of changes, additions, removals and
    duplicates: every one's bytes are json.dumps of the whole document."""
    import dataclasses
    import random

    rnd = random.Random(7)

    def reference(states):
        doc = {"version": 1, "files": {s.file_id: s.to_json() for s in states}}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    def state(i: int, offset: int) -> checkpoint.FileState:
        return checkpoint.FileState(f"id{i}", f"/l/{i}.log", 1, i, 10, "abc", offset, seen=offset)

    live = {i: state(i, 0) for i in range(50)}
    writer = checkpoint.StateFile(tmp_path / "s.json")
    kinds = {"same": 0, "change": 0, "add": 0, "remove": 0, "dup": 0}
    for _ in range(300):
        kind = rnd.choice(list(kinds))
        kinds[kind] += 1
        if kind == "change":
            for i in rnd.sample(sorted(live), 3):
                live[i] = dataclasses.replace(live[i], offset=live[i].offset + 1, seen=live[i].seen + 1)
        elif kind == "add":
            i = max(live) + rnd.randint(1, 5)
            live[i] = state(i, 0)
        elif kind == "remove" and len(live) > 1:
            del live[rnd.choice(sorted(live))]
        states = list(live.values())
        if kind == "dup":  # a later state of one id wins
            i = rnd.choice(sorted(live))
            live[i] = dataclasses.replace(live[i], offset=live[i].offset + 5)
            states = [*states, live[i]]
        rnd.shuffle(states)
        if kind == "dup":
            states = [s for s in states if s is not live[i]] + [live[i]]
        assert writer.encode(states) == reference(list(live.values())), kind
    assert min(kinds.values()) > 30  # every kind of step happened


# -- watch and metrics -----------------------------------------------------------------------


@pytest.mark.parametrize("inotify", [True, False])
def test_watcher_wakes_on_write_and_waker(tmp_path, inotify):
    waker = Waker()
    w = Watcher(waker, use_inotify=inotify)
    try:
        assert w.watch_dirs({str(tmp_path)}) == inotify
        (tmp_path / "new.log").write_bytes(b"x\n")
        got = w.wait(0.5 if inotify else 0.05)
        if inotify:
            assert got.changed and got.modified
        waker.wake()
        assert w.wait(5).woken
        assert not w.wait(0.01).woken
    finally:
        w.close()
        waker.close()


def test_prometheus_text():
    c = Counters(lines_read=5, lines_split=1)
    files = [FileGauge('/l/"a".log', "id", "web", 100, 40)]
    m = AgentMetrics(
        c, lambda: Snapshot("shop", files, {"inflight_bytes": 7}, {"memory": True, "kafka": False})
    )
    m.ack_latency.observe(0.3)
    text = m.render().decode()
    assert "keplerlog_agent_lines_read_total 5.0" in text
    assert "keplerlog_agent_lines_split_total 1.0" in text
    assert 'keplerlog_agent_file_lag_bytes{file="id",module="web",path="/l/\\"a\\".log"} 60.0' in text
    assert "keplerlog_agent_inflight_bytes 7.0" in text
    assert 'keplerlog_agent_paused{reason="memory"} 1.0' in text
    assert 'keplerlog_agent_paused{reason="kafka"} 0.0' in text
    assert 'keplerlog_agent_info{service="shop",version="' in text
    assert 'keplerlog_agent_ack_latency_seconds_bucket{le="0.5"} 1.0' in text
    assert 'keplerlog_agent_ack_latency_seconds_bucket{le="0.25"} 0.0' in text
    assert "process_resident_memory_bytes" in text  # the standard process collector


def test_producer_batches_hold_a_whole_record_or_more(monkeypatch):
    """One batch in flight per partition (idempotence): the batch must carry several reads."""
    import kafka.producer

    from keplerlog.agent import sender as sender_mod

    seen: dict = {}

    class FakeProducer:
        def __init__(self, **kw):
            seen.update(kw)

    monkeypatch.setattr(kafka.producer, "KafkaProducer", FakeProducer)
    cfg = _cfg()
    assert sender_mod.Sender(cfg, lambda: None).connect()
    k = cfg.kafka
    assert seen["enable_idempotence"] is True and seen["acks"] == "all"
    assert seen["batch_size"] == k.max_record_bytes == 900_000
    # never larger than one record may be: a batch can't be refused as too large
    assert seen["batch_size"] <= seen["max_request_size"]
    assert sender_mod.batch_size(64 * 1024) == 256 * 1024
    assert sender_mod.batch_size(2_000_000) == 2_000_000


@pytest.mark.parametrize("mode", ["packed", "one_line", "multiline"])
def test_the_assembler_counts_every_newline_fed_once(mode):
    """`newlines` (the agent's lines_read) equals the newlines in the bytes fed, whatever the
    pieces: partial lines held across feeds, over-long lines cut, records closed when full."""
    import random

    rng = random.Random(5)
    over = {
        "packed": {},
        "one_line": {"one_line_per_record": True},
        "multiline": {"multiline": Multiline(start=re.compile(rb"^\d"), max_lines=4, timeout_ms=500)},
    }[mode]
    a = _asm(max_record_bytes=300, max_line_bytes=100, **over)
    lines = [
        (b"%d" % i if rng.random() < 0.5 else b" ") + b"y" * rng.choice([0, 5, 60, 99, 150, 420]) + b"\n"
        for i in range(400)
    ]
    data = b"".join(lines) + b"tail without newline"
    fed, pos, shipped = 0, 0, []
    while pos < len(data):
        step = rng.choice([1, 7, 64, 333, 1000])
        before = a.newlines
        shipped += a.feed(data[pos : pos + step], 1000.0, 1.0)
        assert a.newlines - before == data[pos : pos + step].count(b"\n")
        pos += step
        fed = a.newlines
    assert fed == len(lines)
    shipped += a.flush()
    assert b"".join(c.data for c in shipped) == data
    # every record as the producer takes it: bytes (not a view of a read), its kl.lines exact,
    # within max_record, each starting where the one before ended
    for c in shipped:  # a piece of an over-long line, or the held end, counts as one line
        assert type(c.data) is bytes and c.lines == c.data.count(b"\n") + (not c.data.endswith(b"\n"))
    assert all(len(c.data) <= 300 for c in shipped)
    assert [c.offset for c in shipped] == [0, *(c.end for c in shipped[:-1])]

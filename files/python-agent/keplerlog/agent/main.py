"""`keplerlog-agent --config agent.yml`: the entry point, and the loop over the agent's parts.

Single process, single reading thread (kafka-python adds its I/O thread; metrics add one when
enabled). `Agent` owns no file or Kafka state of its own; it runs three parts, each with one
job, in a fixed order per step: the ledger applies Kafka results (ledger.py) -> the file set
rescans the globs when directories changed (fileset.py) -> the reader reads what files grew
by, within the memory budget, and flushes timed-out partial lines and events (reader.py) ->
the file set closes finished rotated files -> the ledger checkpoints -> the watermarks account
for the files (watermarks.py: every interval, and at once for files that ended or closed) ->
block in the watcher until something happens. It also owns the lifecycle (signals, the drain at
shutdown) and the metrics snapshot, which reads all three parts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from types import FrameType

from keplerlog import lazyinit
from keplerlog.agent import checkpoint, memory, priority
from keplerlog.agent.config import AgentConfig, ConfigError, load
from keplerlog.agent.fileset import RESCAN_S, FileSet
from keplerlog.agent.identity import FileKey
from keplerlog.agent.ledger import Ledger
from keplerlog.agent.metrics import AgentMetrics, Counters, FileGauge, Snapshot, summary
from keplerlog.agent.pacer import ReadPacer
from keplerlog.agent.reader import Reader
from keplerlog.agent.sender import KafkaSender, make_sender
from keplerlog.agent.tailer import TailedFile
from keplerlog.agent.watch import Waker, Watcher
from keplerlog.agent.watermarks import Book, Watermarks

log = logging.getLogger("keplerlog.agent")


class Agent:
    """Follows the configured files and ships them to Kafka, at least once."""

    def __init__(self, cfg: AgentConfig, *, use_inotify: bool = True) -> None:
        self.cfg = cfg
        self.counters = Counters()
        self.waker = Waker()
        self.watcher = Watcher(self.waker, use_inotify=use_inotify)
        sender = make_sender(cfg, self.waker.wake)
        # The followed files by (dev, inode): the file set opens and closes them, the reader
        # reads them, the ledger re-reads failed records through them and checkpoints them.
        self.files: dict[FileKey, TailedFile] = {}
        # What the file set and the ledger tell the watermarks (ends of files, lost bytes).
        book = Book(cfg.watermarks.enabled)
        self.ledger = Ledger(cfg, sender, self.counters, self.files, book)
        self.fileset = FileSet(cfg, self.counters, self.watcher, self.ledger, self.files, book)
        self.reader = Reader(cfg, self.counters, self.watcher, self.fileset, self.ledger, self._is_stopping)
        self.pacer = ReadPacer(cfg.limits.read_coalesce_ms / 1000, cfg.limits.read_coalesce_lines)
        self.watermarks = Watermarks(cfg, self.counters, book, self.files)
        self.watermarks.ledger, self.watermarks.fileset = self.ledger, self.fileset
        self.stopping = False
        self._next_log = time.monotonic() + cfg.metrics.log_interval_s
        # Last: registering the metrics takes a first snapshot, which reads all three parts.
        self.metrics = AgentMetrics(self.counters, self._snapshot)
        self.ledger.metrics = self.metrics  # the histograms it feeds: record size, ack latency

    def _is_stopping(self) -> bool:
        return self.stopping

    # -- what callers and tests reach through the Agent ----------------------------------------

    @property
    def sender(self) -> KafkaSender:
        """The Kafka producer wrapper (the ledger's); tests put a fake one in its place."""
        return self.ledger.sender

    @sender.setter
    def sender(self, sender: KafkaSender) -> None:
        self.ledger.sender = sender

    @property
    def closed(self) -> dict[FileKey, checkpoint.FileState]:
        """Files shipped to their end and closed, remembered by identity (the file set's)."""
        return self.fileset.closed

    # -- lifecycle ---------------------------------------------------------------------------

    def request_stop(self, signum: int = 0, _frame: FrameType | None = None) -> None:
        """Signal handler: stop reading, drain, checkpoint, exit 0."""
        self.stopping = True
        self.waker.wake()

    def run(self) -> int:
        """Run until `request_stop`; return the exit status."""
        if self.cfg.metrics.port:
            self.metrics.start(self.cfg.metrics.host, self.cfg.metrics.port)
        try:
            while not self.stopping and not self.ledger.sender.connect():
                self.watcher.wait(2.0)
            if not self.stopping:
                self.fileset.scan(time.monotonic())
            while not self.stopping:
                self._step()
            self._shutdown()
        finally:
            for f in self.files.values():
                f.close()
            self.watcher.close()
            self.waker.close()
            self.metrics.stop()
        return 0

    def _step(self) -> None:
        ledger, fileset, reader = self.ledger, self.fileset, self.reader
        mono, wall = time.monotonic(), time.time()
        ledger.reconnect(mono)
        ledger.results()
        if mono >= fileset.next_scan:
            self.fileset.scan(mono)
        counters = self.counters
        bytes_before, lines_before = counters.bytes_read, counters.lines_read
        reader.read_all(wall, mono)
        if counters.bytes_read != bytes_before:
            self.pacer.read(mono, counters.lines_read - lines_before)
        reader.flush_timed_out(wall, mono)
        fileset.finish_detached(mono, [key for key, _ in reader.looking()])
        if mono >= ledger.next_checkpoint:
            fileset.checkpoint()
            ledger.next_checkpoint = mono + self.cfg.limits.checkpoint_interval_ms / 1000
        self.watermarks.step(time.monotonic())
        if self.cfg.metrics.log_interval_s and mono >= self._next_log:
            log.info("stats %s", summary(self.counters, self._gauges(), self._global_gauges()))
            self._next_log = mono + self.cfg.metrics.log_interval_s
        woke = self.watcher.wait(self._timeout(time.monotonic()))
        reader.dirty |= woke.paths
        reader.sweep = reader.sweep or woke.overflow
        if woke.changed:
            fileset.next_scan = 0.0
        # A trickle of one-line writes would cost one read, one record and one produce request
        # per line; waiting read_coalesce_ms after the previous read (or, pacer.py, about
        # read_coalesce_lines lines' time) turns them into one. An idle file is read at once
        # (the previous read is long past).
        coalesce = woke.modified and self.cfg.limits.read_coalesce_ms and not self.stopping
        if coalesce and self.pacer.delay(time.monotonic()) > 0:
            # But notice a truncation at once: copytruncate's copy may be compressed and
            # removed right after it, and the unread tail is only in that copy.
            reader.check_truncations(time.monotonic())
            delay = self.pacer.delay(time.monotonic())
            if delay > 0:
                time.sleep(delay)

    def _timeout(self, mono: float) -> float:
        ledger, fileset = self.ledger, self.fileset
        limit = self.cfg.limits.poll_interval_ms / 1000 if not self.watcher.inotify else RESCAN_S
        deadlines = [fileset.next_scan, self.reader.next_fp_check]
        marks = self.watermarks.deadline()
        if marks is not None and marks > mono:  # overdue: Kafka is away, the loop looks often
            deadlines.append(marks)
        # Idle with every file watched by name, nothing else needs a look: sleep until an event
        # or one of the deadlines. Otherwise (polling, bytes in flight, Kafka away, a send
        # backing off) look again within a second, as always.
        quiet = fileset.watched_all and not ledger.inflight and ledger.sender.connected
        if not quiet or mono < ledger.send_backoff_until:
            deadlines.append(mono + limit)
        if ledger.inflight or ledger.acked_unsaved or ledger.last_state is None:
            # an idle agent sleeps long: wake for the checkpoint of its last acks too
            deadlines.append(ledger.next_checkpoint)
        for _, f in self.reader.looking():  # the files with a deadline are among them
            d = f.assembler.next_deadline()
            # past due with bytes still unread: the flush waits for the read (flush_timed_out),
            # which Kafka's acks wake the loop for; waking for it now would spin while paused
            if d is not None and (d > mono or f.at_eof):
                deadlines.append(d)
            if f.detached:
                deadlines.append(f.last_growth + self.cfg.limits.close_inactive_s)
            if f.rewrite_due is not None and f.rewrite_due > mono:
                deadlines.append(f.rewrite_due)  # a look then confirms a same-bytes rewrite
        return max(0.0, min(deadlines) - mono)

    def _shutdown(self) -> None:
        """Read every followed file to its current end, ship it, wait for the acks, checkpoint.

        supervisord stops the application first and the agent after it, so the application's
        last lines (often why it stopped) were written after the agent's last wake-up: they
        are read now, partial last lines included (shipped as they are). Whatever is not
        acknowledged within `shutdown_timeout_s` is logged with its size and re-read from the
        checkpoint at the next start.
        """
        ledger = self.ledger
        limit = self.cfg.limits.shutdown_timeout_s
        deadline = time.monotonic() + limit
        log.info("stopping: reading every file to its end and shipping it (at most %.0f s)", limit)
        ledger.results()
        if ledger.sender.connected:
            self.fileset.scan(time.monotonic())  # files created since the last rescan
            self._drain_reads(deadline)
        self.reader.flush_all()
        if ledger.sender.connected and ledger.inflight:
            ledger.sender.flush(timeout=max(0.0, deadline - time.monotonic()))
        while ledger.inflight and time.monotonic() < deadline:
            ledger.results()
            if ledger.inflight:
                self.watcher.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        ledger.results()
        self.watermarks.final(deadline)  # after the last acks; may apply late ones: checkpointed next
        self.fileset.checkpoint(final=True)
        pending, unread = ledger.unacknowledged()
        if pending:
            log.warning(
                "stopping with %d bytes not acknowledged (%d of them not read) in %d files; "
                "they are re-read from the checkpoint at the next start",
                sum(pending.values()),
                unread,
                len(pending),
            )
        ledger.sender.close(timeout=1)
        log.info("stopped")

    def _drain_reads(self, deadline: float) -> None:
        """Read every file to its end before `deadline`, waiting for acks when the budget is spent."""
        ledger = self.ledger
        while True:
            self.reader.read_all(time.time(), time.monotonic(), draining=True)
            ledger.results()
            if all(f.at_eof for f in self.files.values()) or time.monotonic() >= deadline:
                return
            ledger.sender.poke()
            self.watcher.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            ledger.results()

    # -- metrics -----------------------------------------------------------------------------

    def _gauges(self) -> list[FileGauge]:
        return [
            FileGauge(f.path, f.stream.file_id, f.inp.module, f.size, f.stream.acks.acked)
            for f in list(self.files.values())
        ]

    def _global_gauges(self) -> dict[str, float]:
        ledger, fileset = self.ledger, self.fileset
        return {
            "inflight_bytes": ledger.inflight,
            "files_open": len(self.files),
            "files_open_limit": fileset.open_limit,
            "files_waiting": fileset.waiting,
            "files_closed_known": len(fileset.closed),
            # idle connections are closed (client and broker, ~10 min): an idle agent is not cut off
            "kafka_connected": 1
            if ledger.sender.broker_connected or (ledger.sender.connected and not ledger.inflight)
            else 0,
        }

    def _snapshot(self) -> Snapshot:
        """Return what a scrape shows (called from the metrics thread)."""
        mono = time.monotonic()
        ledger = self.ledger
        kafka = not ledger.sender.connected or mono < ledger.send_backoff_until
        return Snapshot(
            self.cfg.service,
            self._gauges(),
            self._global_gauges(),
            {"memory": self.reader.paused_memory, "kafka": kafka},
        )


def _check_state_dir(cfg: AgentConfig) -> None:
    directory = cfg.state_file.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"state_file: cannot create {directory}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"state_file: directory {directory} is not writable")


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    memory.tune_malloc()  # first: before the big imports and threads allocate
    lazyinit.defer_package_init("kafka")  # the agent only needs kafka.producer (see lazyinit.py)
    lazyinit.defer_package_init("confluent_kafka")  # and librdkafka's binding, .cimpl (rdsender.py)
    parser = argparse.ArgumentParser(prog="keplerlog-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="agent YAML file")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--no-inotify", action="store_true", help="poll instead of using inotify")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.log_level == "DEBUG":
        logging.getLogger("kafka").setLevel(logging.DEBUG)  # else: sender.py keeps it quiet
    try:
        cfg = load(args.config)
        _check_state_dir(cfg)
    except ConfigError as exc:
        print(f"keplerlog-agent: config error: {exc}", file=sys.stderr)
        return 2
    priority.apply(cfg.limits.nice, cfg.limits.ionice)
    agent = Agent(cfg, use_inotify=not args.no_inotify)
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())

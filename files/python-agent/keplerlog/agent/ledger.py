"""The send-and-ack ledger: what was handed to Kafka, what came back, what may be checkpointed.

Filebeat calls this part the registrar. It owns every byte between "read" and "acknowledged":
records go out through `send`, outcomes come back through `results` (on the main thread:
kafka-python's callbacks only queue them, see sender.py), the bytes in flight (`inflight`,
which the reader's memory budget counts), the failures (a failed record is re-read from its
file, or from the rotated copy that carries its identity), the producer that failed for good
and its replacement with a doubling pause, and the state file. Keeping all of this in one place
is what makes the delivery guarantee easy to check: a checkpoint is built only from the ack
trackers' contiguous acknowledged offsets (`checkpoint.state_of`), never from read offsets.

The ledger does not decide which files exist: it sees the followed files (`files`, the dict the
file set fills) only to find the descriptor that re-reads a failed record and to list what
the state file must hold. Watermarks (watermarks.py) go through the same producer but are not
its business: their outcomes go back to their owner (`token.done`), and bytes that can never be
re-read are told to the watermarks' book.
"""

from __future__ import annotations

import logging
import queue
import time

from keplerlog.agent import checkpoint
from keplerlog.agent.assembler import Chunk
from keplerlog.agent.config import AgentConfig
from keplerlog.agent.identity import FileKey
from keplerlog.agent.metrics import AgentMetrics, Counters
from keplerlog.agent.sender import KafkaSender
from keplerlog.agent.tailer import Stream, TailedFile
from keplerlog.agent.watermarks import Book
from keplerlog.record import Batch

# One logger for the whole agent loop (main, fileset, reader, ledger): the log lines name
# `keplerlog.agent` as they did when all of it was one module.
log = logging.getLogger("keplerlog.agent")

SEND_BACKOFF_S = 1.0
RENEW_BACKOFF_MAX_S = 30.0


class Ledger:
    """Sends records, applies their outcomes, re-reads failures, checkpoints acknowledged offsets."""

    def __init__(
        self,
        cfg: AgentConfig,
        sender: KafkaSender,
        counters: Counters,
        files: dict[FileKey, TailedFile],
        book: Book,
    ) -> None:
        self.cfg = cfg
        self.sender = sender
        self.counters = counters
        self.book = book  # bytes lost for good, for the watermarks
        # Set by the Agent once its registry exists (registering takes a snapshot of every part).
        self.metrics: AgentMetrics
        self.files = files
        self.inflight = 0  # bytes sent, not yet acknowledged or failed
        self.state_file = checkpoint.StateFile(cfg.state_file)  # re-encodes changed entries only
        self.last_state: list[checkpoint.FileState] | None = None
        self.last_copies: dict[FileKey, int] = {}
        self.acked_unsaved = False  # an ack advanced since the last checkpoint
        self.next_checkpoint = 0.0
        self.send_backoff_until = 0.0  # no reading or sending before this (monotonic)
        self.next_connect = 0.0
        self.renew_backoff = SEND_BACKOFF_S

    def reconnect(self, mono: float) -> None:
        """Create the producer again if a renewal found no broker (rare): every few seconds."""
        if not self.sender.connected and mono >= self.next_connect and not self.sender.connect():
            self.next_connect = time.monotonic() + 2 * SEND_BACKOFF_S

    def send(self, f: TailedFile, stream: Stream, chunks: list[Chunk]) -> None:
        """Hand records to the producer; a synchronous failure backs off and re-reads from there."""
        for chunk in chunks:
            batch = Batch(
                service=self.cfg.service,
                module=f.inp.module,
                host=self.cfg.host,
                path=f.path,
                file_id=stream.file_id,
                offset=chunk.offset,
                lines=chunk.lines,
                ts_ms=chunk.ts_ms,
            )
            size = len(chunk.data)
            try:
                self.sender.send(
                    chunk.data,
                    batch.key(),
                    batch.headers(),
                    (f, stream, chunk.offset, size, chunk.lines, chunk.ts_ms),
                )
            except Exception as exc:
                self.counters.send_errors += 1
                log.warning("%s: send failed at offset %d: %s", f.path, chunk.offset, exc)
                self.send_backoff_until = time.monotonic() + SEND_BACKOFF_S
                self._failed(f, stream, chunk.offset, size)
                return
            self.inflight += size
            stream.inflight += size
            stream.records_inflight += 1
            self.counters.records_sent += 1
            self.counters.lines_sent += chunk.lines
            self.counters.bytes_sent += size
            self.metrics.record_bytes.observe(size)

    def results(self) -> None:
        """Apply acknowledgements and failures reported by the producer thread.

        A producer can also break with nothing failed (librdkafka facing a rebuilt cluster holds
        its records for ever, rdsender.py): it is renewed here too, and its records fail then.
        """
        if self.sender.broken and self.sender.connected and time.monotonic() >= self.send_backoff_until:
            self._renew_producer(self.sender.broken_reason)
        results = self.sender.results
        while True:
            try:
                outcome = results.get_nowait()
            except queue.Empty:
                return
            token = outcome.token
            if token.__class__ is not tuple:  # a watermark: its owner applies the outcome
                token.done(outcome.error)
                if outcome.error is not None and self.sender.broken:
                    self._renew_producer(str(outcome.error))
                continue
            f, stream, offset, size, lines, ts_ms = token
            self.inflight -= size
            stream.inflight -= size
            stream.records_inflight -= 1
            if outcome.error is None:
                self.counters.records_acked += 1
                self.counters.lines_acked += lines
                self.counters.bytes_acked += size
                stream.acks.ack(offset, offset + size)
                self.metrics.ack_latency.observe(max(0.0, time.time() - ts_ms / 1000))
                self.acked_unsaved = True
                self.renew_backoff = SEND_BACKOFF_S
            else:
                self.counters.send_errors += 1
                log.warning("%s: record at offset %d failed: %s", f.path, offset, outcome.error)
                self._failed(f, stream, offset, size)
                if self.sender.broken:
                    self._renew_producer(str(outcome.error))

    def _renew_producer(self, error: str) -> None:
        """Replace a producer that failed for good (sender.py); its records are re-sent.

        Sending again at once would turn a record the broker keeps refusing into a loop of new
        producers and connections: the sends wait first, twice as long each time (up to
        RENEW_BACKOFF_MAX_S) until a record is acknowledged again.
        """
        self.counters.producer_renewals += 1
        log.warning(
            "the Kafka producer stopped for good after %s; replacing it and re-sending every "
            "record not acknowledged in %.0f s",
            error,
            self.renew_backoff,
        )
        if not self.sender.renew():
            self.next_connect = time.monotonic() + self.renew_backoff
        self.send_backoff_until = time.monotonic() + self.renew_backoff
        self.renew_backoff = min(RENEW_BACKOFF_MAX_S, 2 * self.renew_backoff)

    def _failed(self, f: TailedFile, stream: Stream, offset: int, size: int) -> None:
        """Re-read from a failed record's offset (from the rotated copy after a truncation)."""
        if stream is not f.stream or f.fd < 0:
            copy = next((c for c in self.files.values() if c.stream is stream and c.fd >= 0), None)
            if copy is None:
                self.counters.lost_bytes += self.book.lose(stream.file_id, offset, offset + size, "truncated")
                log.warning(
                    "%s: %d bytes at offset %d of %s lost (truncated)", f.path, size, offset, stream.file_id
                )
                return
            f = copy
        target = max(offset, stream.acks.acked)
        if target < f.read_offset:
            f.rewind(target)
            self.counters.rewinds += 1

    def checkpoint(
        self,
        closed: dict[FileKey, checkpoint.FileState],
        *,
        final: bool = False,
        copies: dict[FileKey, int] | None = None,
    ) -> None:
        """Write the acknowledged offsets of the followed and the `closed` files, and `copies`.

        `copies`: rotated copies never to ship (FileSet.checkpoint passes all three).

        A change of `seen` alone (a file grew, nothing more acknowledged) is written with the
        next change, or at the `final` checkpoint of a shutdown: a restart must know what the
        agent had seen and not shipped when it stopped.
        """
        states = [checkpoint.state_of(f) for f in self.files.values()]
        ids = {s.file_id for s in states}
        states += [s for s in closed.values() if s.file_id not in ids]
        last = self.last_state
        seen_moved = final and last is not None and [s.seen for s in states] != [s.seen for s in last]
        copies = dict(copies or {})
        if states == last and not seen_moved and copies == self.last_copies:
            self.acked_unsaved = False
            return
        try:
            self.state_file.save(states, copies)
        except OSError as exc:
            self.counters.errors += 1
            log.error("cannot write state file %s: %s", self.cfg.state_file, exc)
            return
        self.last_state = states
        self.last_copies = copies
        self.acked_unsaved = False
        self.counters.checkpoints += 1

    def unacknowledged(self) -> tuple[dict[str, int], int]:
        """Bytes per file id between the acknowledged offset and the file's end; and unread bytes."""
        pending: dict[str, int] = {}
        unread = 0
        for f in self.files.values():
            behind = max(f.size, f.read_offset) - f.stream.acks.acked
            if behind > 0:
                pending[f.stream.file_id] = pending.get(f.stream.file_id, 0) + behind
                unread += max(0, f.size - f.read_offset)
        return pending, unread

"""Watermarks: the agent's account of each file's bytes, for the consumer's completeness audit.

The format and what it means are record.py's (`Watermark`). This module decides what each
file's account says and when it goes out. The file set and the ledger only tell its `Book`
about events, each in O(1): bytes known lost and why, a file id that ended (truncated, deleted,
rotated away unseen), a file to account for at the next loop turn (closed, finished). Reading,
sending and acknowledging lines do no watermark work at all: an account is built from numbers
the agent keeps anyway (the size last seen, the contiguous acknowledged offset), once per file
per `interval_s`, and only the accounts that changed (or are `refresh_s` old) are sent.

Why `acked` can be trusted: it is `AckTracker.acked`, which only moves when the ledger applies
an acknowledgement on the main thread, after Kafka stored those records. The watermark is
produced after that, through the same producer with the same key, so it lands on the same
partition at a higher offset than every record it accounts for. Watermarks are not data: they
are not in the line/byte/record counters, the memory budget or the state file, never re-read;
one whose send fails is counted and sent again at the next interval. At most one per file is
in flight, so a long Kafka outage cannot pile them up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keplerlog.agent.checkpoint import FileState
from keplerlog.agent.config import AgentConfig
from keplerlog.agent.identity import FileKey
from keplerlog.agent.metrics import Counters
from keplerlog.agent.tailer import Stream, TailedFile
from keplerlog.record import Watermark, merge_lost

if TYPE_CHECKING:  # import cycles: the file set and the ledger report to the Book
    from keplerlog.agent.fileset import FileSet
    from keplerlog.agent.ledger import Ledger

log = logging.getLogger("keplerlog.agent")  # one logger for the agent loop (see ledger.py)

Range = tuple[int, int, str]  # [start, end) of a file id's bytes and why they were lost
Account = tuple[int, int, str, tuple[Range, ...]]  # seen, acked, state, lost: what a mark says

# At shutdown, the least time the last watermarks may wait for their acks (they get what is left
# of the shutdown budget when that is more; when data is still in flight, Kafka is slow or away
# and the producer's close gets the only chance).
FINAL_WAIT_S = 1.0
# Ended file ids whose last account waits for Kafka (an outage while files rotate away): past
# this many, the oldest is dropped, logged (its last watermark then says less than it could,
# never more). ~300 bytes each.
MAX_ENDED = 10_000


def unknown_file_id(key: FileKey) -> str:
    """Return the id of a file the agent never opened (no fingerprint without reading it)."""
    return f"w:{key[0]}:{key[1]}"


def covered(ranges: tuple[Range, ...], start: int, end: int) -> int:
    """Bytes of [start, end) that `ranges` already cover (ranges may overlap each other)."""
    total, pos = 0, start
    for s, e, _ in sorted(ranges):
        s, e = max(s, pos), min(e, end)
        if e > s:
            total += e - s
            pos = e
    return total


@dataclass(slots=True)
class Ended:
    """A file id the agent neither follows nor remembers any more: its last account.

    `stream` is kept while records of the id may still be in flight (a truncated file's held
    bytes): the account waits for their outcomes and takes `acked` from it.
    """

    path: str
    module: str
    first: int
    seen: int
    acked: int
    stream: Stream | None = None

    def account(self, lost: tuple[Range, ...]) -> Account:
        """Return what its watermark says: gone with bytes lost, else finished (shipped to its end)."""
        acked = self.stream.acks.acked if self.stream is not None else self.acked
        seen = max(self.seen, acked, max((e for _, e, _ in lost), default=0))
        return seen, acked, "gone" if lost else "finished", lost


class Book:
    """What the file set and the ledger report for the watermarks; each call is O(1).

    Disabled (`watermarks.interval_s: 0`) it keeps nothing, but `lose` still returns the bytes,
    which the callers add to `lost_bytes` either way.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.lost: dict[str, tuple[Range, ...]] = {}  # per file id, merged and capped
        self.ended: dict[str, Ended] = {}
        self.due: set[FileKey] = set()  # followed or closed files to account for at once
        self.dropped = 0  # ended ids dropped at MAX_ENDED

    def note(self, key: FileKey) -> None:
        """Account for the file known under `key` at the next loop turn (it closed, or lost bytes)."""
        if self.enabled:
            self.due.add(key)

    def lose(self, file_id: str, start: int, end: int, reason: str) -> int:
        """Record bytes [start, end) of `file_id` as lost; return how many were not recorded yet."""
        if end <= start:
            return 0
        if not self.enabled:
            return end - start
        ranges = self.lost.get(file_id, ())
        new = end - start - covered(ranges, start, end)
        self.lost[file_id] = merge_lost((*ranges, (start, end, reason)))
        return new

    def end(self, file_id: str, ended: Ended) -> None:
        """`file_id` is neither followed nor remembered any more: send its last account."""
        if not self.enabled:
            return
        if len(self.ended) >= MAX_ENDED and file_id not in self.ended:
            oldest = next(iter(self.ended))
            self.forget(oldest)
            if not self.dropped:
                log.warning(
                    "%d ended files wait for their last watermark (Kafka away?): the oldest are "
                    "dropped from now on; their last watermark will not be sent",
                    MAX_ENDED,
                )
            self.dropped += 1
        self.ended[file_id] = ended

    def forget(self, file_id: str) -> None:
        """Drop what is kept of `file_id` (its last account is delivered, or nobody needs it)."""
        self.lost.pop(file_id, None)
        self.ended.pop(file_id, None)


@dataclass(slots=True)
class _Said:
    """What the last watermark of one file id said, and its send."""

    account: Account | None  # None: failed, to be sent again
    at: float  # monotonic time it was handed to the producer
    module: str = ""
    inflight: bool = False
    retry: bool = False  # failed: sent again at the next interval, not at once


class _Token:
    """The producer's token of a watermark: its outcome goes back to `Watermarks`."""

    __slots__ = ("file_id", "final", "owner")

    def __init__(self, owner: Watermarks, file_id: str, final: bool) -> None:
        self.owner = owner
        self.file_id = file_id
        self.final = final

    def done(self, error: BaseException | None) -> None:
        """Apply the producer's outcome (the ledger calls it on the main thread)."""
        self.owner.outcome(self, error)


class Watermarks:
    """Sends each file's account: changed ones every interval, ended and closed ones at once."""

    def __init__(
        self, cfg: AgentConfig, counters: Counters, book: Book, files: dict[FileKey, TailedFile]
    ) -> None:
        self.cfg = cfg
        self.interval = cfg.watermarks.interval_s
        self.refresh = cfg.watermarks.refresh_s
        self.counters = counters
        self.book = book
        self.files = files
        self.said: dict[str, _Said] = {}
        # When the next full pass is due; the first one an interval after the start, when the
        # files found at the start have shipped something worth telling.
        self.next_pass = time.monotonic() + self.interval
        self.hold_until = 0.0  # after a send raised: nothing before the next interval
        # Set by the Agent (the parts are built around each other): the producer and Kafka's
        # state come from the ledger, the closed files and the inputs from the file set.
        self.ledger: Ledger
        self.fileset: FileSet

    @property
    def enabled(self) -> bool:
        """False with `interval_s: 0`: no watermark is ever sent."""
        return self.interval > 0

    def deadline(self) -> float | None:
        """When the loop must wake for the next pass (None: never)."""
        return self.next_pass if self.enabled else None

    # -- the passes ---------------------------------------------------------------------------

    def step(self, mono: float) -> None:
        """Once per loop turn: the full pass when due, else only files with news (cheap)."""
        if not self.enabled:
            return
        full = mono >= self.next_pass
        book = self.book
        if not full and not book.due and not book.ended:
            return
        ledger = self.ledger
        if mono < self.hold_until or not ledger.sender.connected or mono < ledger.send_backoff_until:
            return  # Kafka away or refusing: everything waits (the loop wakes often then)
        if full:
            self.next_pass = mono + self.interval
            self._pass_all(mono)
        else:
            self._pass_news(mono)

    def _pass_all(self, mono: float) -> None:
        """Offer every followed, closed and ended file; forget marks no file stands for any more."""
        visited: set[str] = set()
        deferred: set[FileKey] = set()  # their last mark is in flight: news stay due
        for key, f in list(self.files.items()):
            visited.add(f.stream.file_id)
            sent = self._offer_open(f, mono)
            if sent is None:
                return
            if not sent:
                deferred.add(key)
        for key, st in list(self.fileset.closed.items()):
            if st.file_id in visited:
                continue
            visited.add(st.file_id)
            sent = self._offer_closed(key, st, mono)
            if sent is None:
                return
            if not sent:
                deferred.add(key)
        self.book.due &= deferred
        if not self._pass_ended(mono, retry=True):
            return
        keep = visited | self.book.ended.keys()
        for fid in [k for k in self.said if k not in keep]:
            del self.said[fid]  # forgotten files are never re-sent
        for fid in [k for k in self.book.lost if k not in keep]:
            del self.book.lost[fid]

    def _pass_news(self, mono: float) -> None:
        """Offer the files the book named (`due`) and the ended ones, between full passes."""
        due = self.book.due
        closed = self.fileset.closed
        for key in list(due):
            f = self.files.get(key)
            if f is not None:
                sent = self._offer_open(f, mono, news=True)
            elif key in closed:
                sent = self._offer_closed(key, closed[key], mono, news=True)
            else:
                sent = True  # neither followed nor remembered: its end (if any) is in `ended`
            if sent is None:
                return  # the producer raised: wait for the next interval
            if sent:
                due.discard(key)
        self._pass_ended(mono, retry=False)

    def _pass_ended(self, mono: float, *, retry: bool) -> bool:
        """Send the last account of ended files whose records have all come back; False if a send raised."""
        for fid, e in list(self.book.ended.items()):
            if e.stream is not None and e.stream.inflight > 0:
                continue  # its outcomes decide acked and may add lost bytes
            said = self.said.get(fid)
            account = e.account(self.book.lost.get(fid, ()))
            if said is not None and said.account == account and not said.inflight:
                self._delivered(fid)  # said already (a finished file that went away)
                continue
            ok = self._offer(fid, mono, account[:3], e.path, e.first, e.module, final=True, news=not retry)
            if ok is None:
                return False
        return True

    def _offer_open(
        self, f: TailedFile, mono: float, *, news: bool = False, force: bool = False
    ) -> bool | None:
        """Offer a followed file's account (see `_offer`)."""
        s = f.stream
        head = (max(f.size, s.acks.acked), s.acks.acked, "open")
        return self._offer(
            s.file_id, mono, head, f.path, s.first, f.inp.module, final=False, news=news, force=force
        )

    def _offer_closed(self, key: FileKey, st: FileState, mono: float, *, news: bool = False) -> bool | None:
        """Offer the account of a file closed and remembered by identity (see `_offer`).

        Shipped to its end when it was closed; if it grew since and waits for a descriptor
        slot, the size the last rescan saw.
        """
        fileset = self.fileset
        waiting = fileset.unopened.get(key)
        seen = max(st.seen, st.offset, waiting[2] if waiting is not None else 0)
        head = (seen, st.offset, "finished" if key in fileset.finished else "closed")
        return self._offer(st.file_id, mono, head, st.path, st.first, "", final=False, news=news)

    def _offer(
        self,
        file_id: str,
        mono: float,
        head: tuple[int, int, str],
        path: str,
        first: int,
        module: str,
        *,
        final: bool,
        news: bool = False,
        force: bool = False,
    ) -> bool | None:
        """Send `file_id`'s account if it changed or is `refresh_s` old.

        True: sent or nothing to send; False: deferred (its last one is still in flight, or it
        failed and waits for the interval); None: the producer raised (the pass stops).
        """
        lost = self.book.lost.get(file_id, ())
        seen, acked, state = head
        account: Account = (max(seen, max((e for _, e, _ in lost), default=0)), acked, state, lost)
        said = self.said.get(file_id)
        if said is not None:
            if said.inflight and not force:
                return False
            if news and said.retry:
                return False
            if not force and said.account == account and mono - said.at < self.refresh:
                return True
            module = module or said.module
        if not module:
            inp = self.fileset.input_of(path)
            module = inp.module if inp is not None else self.cfg.module
        mark = Watermark(
            service=self.cfg.service,
            module=module,
            host=self.cfg.host,
            path=path,
            file_id=file_id,
            ts_ms=time.time_ns() // 1_000_000,
            first=min(first, acked),
            seen=account[0],
            acked=acked,
            state=state,
            lost=lost,
        )
        try:
            self.ledger.sender.send(mark.value(), mark.key(), mark.headers(), _Token(self, file_id, final))
        except Exception as exc:
            self.counters.watermarks_failed += 1
            self.hold_until = self.next_pass = mono + self.interval
            log.warning("watermark of %s not sent: %s; sent again in %.0f s", path, exc, self.interval)
            return None
        self.counters.watermarks_sent += 1
        if said is None:
            self.said[file_id] = _Said(account, mono, module, inflight=True)
        else:
            said.account, said.at, said.module, said.inflight, said.retry = account, mono, module, True, False
        return True

    # -- outcomes and the end ----------------------------------------------------------------

    def outcome(self, token: _Token, error: BaseException | None) -> None:
        """Apply a watermark's outcome (on the main thread, from the ledger)."""
        said = self.said.get(token.file_id)
        if error is not None:
            self.counters.watermarks_failed += 1
            log.debug("watermark of %s failed: %s; sent again at the next interval", token.file_id, error)
            if said is not None:
                said.inflight, said.account, said.retry = False, None, True
            return
        if said is None:
            return  # forgotten meanwhile
        said.inflight = False
        ended = self.book.ended.get(token.file_id)
        if (
            token.final
            and ended is not None
            and ended.account(self.book.lost.get(token.file_id, ())) == said.account
        ):
            self._delivered(token.file_id)

    def _delivered(self, file_id: str) -> None:
        """Forget everything about an ended file: its last account is in Kafka."""
        self.book.forget(file_id)
        self.said.pop(file_id, None)

    def final(self, deadline: float = 0.0) -> None:
        """At shutdown, after the last acks: one last watermark per followed file (best effort).

        Sent even when unchanged (it tells where this run stopped), plus the pending news;
        waits for them until the shutdown's `deadline` (monotonic), at least FINAL_WAIT_S (a
        Kafka slower than that second to acknowledge still gets the last marks while the
        shutdown budget lasts), and not at all while data is still unacknowledged.
        """
        ledger = self.ledger
        if not self.enabled or not ledger.sender.connected:
            return
        mono = time.monotonic()
        for f in list(self.files.values()):
            if self._offer_open(f, mono, force=True) is None:
                return
        self.hold_until = 0.0
        self._pass_news(mono)
        if ledger.inflight == 0:
            ledger.sender.flush(timeout=max(FINAL_WAIT_S, deadline - time.monotonic()))
            ledger.results()

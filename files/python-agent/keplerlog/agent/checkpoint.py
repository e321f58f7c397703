"""The state file: per file identity, the offset up to which Kafka acknowledged every byte.

Written only from acknowledged offsets (never from read offsets), so after a crash or
`kill -9` the agent re-sends at most what was in flight: at-least-once. Two more numbers per
file only feed the watermarks (watermarks.py) across a restart, never a read position: `first`,
where shipping of the id began (above 0 only for `start_at: end`), and `seen`, the size last
seen, so a file rotated away while the agent was stopped is reported with the bytes it had seen
and not shipped. And a mark of the bytes just before the offset (`identity.TailMark`), so that a
file rewritten while the agent was stopped is not resumed as if it had only grown. Beside the
files, the copies: rotated copies whose bytes were shipped under another file's id (FileSet.copies),
by device, inode and mtime, so that a restart does not ship them again. The write is atomic
and durable: a temporary file in the same directory is written and fsynced, renamed over the
old one, and the directory is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keplerlog.agent.identity import FileIdentity, FileKey, Fingerprint, TailMark
from keplerlog.durable import atomic_write

if TYPE_CHECKING:
    from keplerlog.agent.tailer import TailedFile

log = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class FileState:
    """What the state file remembers about one file."""

    file_id: str
    path: str
    dev: int
    ino: int
    fp_len: int
    fp_hash: str
    offset: int
    first: int = 0  # where shipping of this id began (watermarks)
    # The file's size when last seen, at least `offset` (watermarks). Not compared: a file that
    # only grew (Kafka away) must not cost a state file write (an fsync) every interval; it is
    # written with the next change of an offset, and always at shutdown (Ledger.checkpoint).
    seen: int = field(default=0, compare=False)
    # The module of the input that followed it: a watermark of the file, sent when it is no
    # longer followed, must go on its data's key (partition). Found again from the path, an
    # input over /var/log/*.log could claim /var/log/nginx/a.log, or a rotated name none.
    module: str = ""
    # The bytes before `offset` as they were when acknowledged: checked with the fingerprint
    # before the file is resumed at `offset` (`matches_fd`).
    mark: TailMark = field(default_factory=TailMark)

    def matches_fd(self, fd: int, size: int) -> bool:
        """Tell whether the open file (of `size` bytes) is this one, grown or not, at most."""
        return self.offset <= size and self.identity().fingerprint.matches_fd(fd) and self.mark.matches_fd(fd)

    def identity(self) -> FileIdentity:
        """Return the identity to resume this file under."""
        return FileIdentity(self.file_id, self.dev, self.ino, Fingerprint(self.fp_len, self.fp_hash))

    def to_json(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "path": self.path,
            "dev": self.dev,
            "ino": self.ino,
            "fp_len": self.fp_len,
            "fp": self.fp_hash,
            "offset": self.offset,
            "first": self.first,
            "seen": max(self.seen, self.offset),
            "module": self.module,
            "tail_len": self.mark.length,
            "tail": self.mark.digest,
        }


def state_of(f: TailedFile) -> FileState:
    """Return what the state file keeps of a followed file: identity and *acknowledged* offset.

    Never the read offset: a restart must re-send whatever was in flight (at-least-once).
    The state built last time is returned again while it is exact (same id, acknowledged
    offset, size seen and start): a checkpoint of one busy file among a thousand open ones
    builds one state, and the unchanged ones compare and encode by identity.
    """
    ident = f.stream.identity
    acked = f.stream.acks.acked
    seen = max(f.size, acked)
    last = f.saved_state
    if (
        last is not None
        and last.offset == acked
        and last.seen == seen
        and last.file_id == ident.file_id
        and last.first == f.stream.first
        and last.path == f.path
        and last.fp_len == ident.fingerprint.length  # grown by a read since: written again
        and (last.mark.length or not acked)  # a mark that could not be read is tried again
    ):
        return last
    f.saved_state = FileState(
        file_id=ident.file_id,
        path=f.path,
        dev=ident.dev,
        ino=ident.ino,
        fp_len=ident.fingerprint.length,
        fp_hash=ident.fingerprint.digest,
        offset=acked,
        first=f.stream.first,
        seen=seen,
        module=f.inp.module,
        mark=f.acked_mark(),
    )
    return f.saved_state


def load(path: Path, *, first_unknown_at_offset: bool = False) -> dict[str, FileState]:
    """Read the state file; a missing file is an empty state, a corrupt one is logged and ignored.

    Ignoring a corrupt state re-ships files from the start (duplicates, not loss), which beats
    refusing to start and shipping nothing. A state written before watermarks has no `first`
    and `seen`: `seen` is then the offset (nothing seen beyond it is known), and `first` 0, or
    the offset with `first_unknown_at_offset` (start_at: end, where files found at the very
    first start began at their end: claiming 0 would make the audit miss bytes never meant to
    be shipped).
    """
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.error("state file %s unreadable (%s); starting without it", path, exc)
        return {}
    out: dict[str, FileState] = {}
    try:
        if raw.get("version") != STATE_VERSION:
            raise ValueError(f"unknown state version {raw.get('version')!r}")
        for file_id, item in raw["files"].items():
            offset = int(item["offset"])
            first = int(item.get("first", offset if first_unknown_at_offset else 0))
            out[file_id] = FileState(
                file_id=str(file_id),
                path=str(item["path"]),
                dev=int(item["dev"]),
                ino=int(item["ino"]),
                fp_len=int(item["fp_len"]),
                fp_hash=str(item["fp"]),
                offset=offset,
                first=min(first, offset),
                seen=max(int(item.get("seen", offset)), offset),
                module=str(item.get("module", "")),
                mark=_mark(item, offset),
            )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        log.error("state file %s malformed (%s); starting without it", path, exc)
        return {}
    return out


def load_copies(path: Path) -> dict[FileKey, int]:
    """Read the state file's copies: (dev, inode) -> mtime_ns. Missing or unreadable: none.

    Forgetting them costs duplicates (a copy matched by a glob shipped again), never loss, so a
    bad entry drops the list, not the state; `load` reports a file it cannot read.
    """
    try:
        raw = json.loads(path.read_bytes())
        return {(int(dev), int(ino)): int(mtime) for dev, ino, mtime in raw.get("copies", [])}
    except FileNotFoundError:
        return {}
    except (OSError, AttributeError, TypeError, ValueError) as exc:
        log.warning("state file %s: rotated copies unreadable (%s); judged again", path, exc)
        return {}


def _mark(item: dict[str, Any], offset: int) -> TailMark:
    """Read the saved mark before `offset` (none in a state file written before marks existed)."""
    length = int(item.get("tail_len", 0))
    if not 0 <= length <= offset:
        raise ValueError(f"tail_len {length} outside 0..{offset}")
    return TailMark(offset, length, str(item.get("tail", ""))) if length else TailMark()


class StateFile:
    """Writes the state file, encoding again only the entries that changed since the last write.

    The agent checkpoints once a second while anything is acknowledged, and the state holds
    every known file, closed ones included. Encoding all of them every time made the cost of
    one busy file grow with the number of idle ones (10,000 known files: 40-70 ms a
    checkpoint, most of the agent's CPU). Each entry's JSON is kept with the state it was made
    from and reused while that state is unchanged. The bytes are those of `json.dumps` of the
    whole document with sorted keys and compact separators, as before.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, tuple[FileState, bytes]] = {}
        # The entries' bytes in file id order, and each id's place: while the set of ids stays
        # the same, a changed entry replaces its bytes in place (no sort, no lookup per entry).
        self._blobs: list[bytes] = []
        self._place: dict[str, int] = {}

    def encode(self, files: list[FileState], copies: dict[FileKey, int] | None = None) -> bytes:
        """Return the state file's bytes for `files` and `copies`.

        A later state of one file id wins; `copies` ((dev, inode) -> mtime_ns) is left out when
        there are none, and the bytes are those of the document before copies were kept.
        """
        old, entries = self._entries, {}
        same_ids = True
        changed: list[str] = []
        for state in files:
            file_id = state.file_id
            hit = old.get(file_id)
            if hit is None or hit[0] is not state:
                if hit is not None and hit[0] == state and hit[0].seen == state.seen:
                    hit = (state, hit[1])  # an equal copy: next time `is` answers
                else:
                    same_ids = same_ids and hit is not None
                    key = json.dumps(file_id)
                    body = json.dumps(state.to_json(), separators=(",", ":"), sort_keys=True)
                    hit = (state, f"{key}:{body}".encode())
                    changed.append(file_id)
            entries[file_id] = hit
        self._entries = entries  # forgotten files leave the cache with the state
        if same_ids and len(entries) == len(old) and len(self._blobs) == len(entries):
            blobs, place = self._blobs, self._place
            for file_id in changed:
                blobs[place[file_id]] = entries[file_id][1]
        else:
            order = sorted(entries)
            self._place = {file_id: n for n, file_id in enumerate(order)}
            self._blobs = [entries[file_id][1] for file_id in order]
        doc = b'"files":{%s},"version":%d}' % (b",".join(self._blobs), STATE_VERSION)
        if not copies:
            return b"{" + doc
        listed = json.dumps(
            sorted([dev, ino, mtime] for (dev, ino), mtime in copies.items()), separators=(",", ":")
        )
        return b'{"copies":%s,%s' % (listed.encode(), doc)

    def save(self, files: list[FileState], copies: dict[FileKey, int] | None = None) -> None:
        """Atomically and durably replace the state file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, self.encode(files, copies), mode=0o640)


def save(path: Path, files: list[FileState], copies: dict[FileKey, int] | None = None) -> None:
    """Atomically and durably replace the state file (one write; see `StateFile`)."""
    StateFile(path).save(files, copies)

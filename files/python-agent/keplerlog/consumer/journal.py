"""Durable per-partition state and the write-ahead intent that keeps it consistent with data.

Protocol of one batch (see README.md):
1. intent `write`: for every target file its size before the append;
2. append + fsync the data files;
3. intent `commit`: the new state of every partition in the batch;
4. replace each partition state file, then intent `done`;
5. commit the offsets to Kafka (informational: the state file is authoritative).
A crash in 1-2 is undone by truncating the files back (rollback); a crash in 3-4 is completed
from the intent (roll forward). The intent lives in two slot files written in place
(intents.py); consumers before them wrote `<id>.intent.json`, still recovered. Each consumer
process holds an flock on its own lock file for its lifetime so that a peer recovers only the
intents of dead processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from keplerlog.durable import fsync_dir
from keplerlog.paths import UnsafePathError, make_dirs, open_beneath

from . import coverage, intents
from .files import replace_all
from .locks import Locks
from .marks import Mark, decode_all, encode_all

log = logging.getLogger(__name__)

STATE_SUBDIR = ".keplerlog/state"


@dataclass
class PartitionState:
    """What one partition has durably written.

    `next_offset` is the next Kafka offset to read (authoritative over the group commit);
    `files` maps a source file key to its written byte ranges (coverage.py) for replay dedup;
    `marks` maps it to its latest reconciled watermark (marks.py), for the completeness audit.
    """

    next_offset: int | None = None
    files: dict[str, coverage.Entry] = field(default_factory=dict)
    marks: dict[str, Mark] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """Return the serialisable form."""
        body: dict[str, object] = json.loads(self.dumps())
        return body

    def dumps(self) -> str:
        """Return the JSON text; marks are joined from their own, already encoded, JSON."""
        head = json.dumps({"next_offset": self.next_offset, "files": self.files})
        if not self.marks:
            return head
        return f'{head[:-1]}, "marks": {encode_all(self.marks)}}}'

    @classmethod
    def from_json(cls, data: dict[str, object]) -> PartitionState:
        """Parse the serialised form (raises ValueError/TypeError/KeyError if malformed)."""
        next_offset = data.get("next_offset")
        files = data.get("files") or {}
        if next_offset is not None and not isinstance(next_offset, int):
            raise ValueError("next_offset is not an integer")
        if not isinstance(files, dict):
            raise ValueError("files is not a mapping")
        return cls(
            next_offset,
            {str(k): coverage.from_state(v) for k, v in files.items()},
            decode_all(data.get("marks")),  # absent in state files older than the audit
        )


def state_name(topic: str, partition: int) -> str:
    """File name of one partition's state (Kafka topic names are path-safe)."""
    return f"{topic}-partition-{partition}.json"


class Journal:
    """State files and intents of one consumer process below `{root}/.keplerlog/state`."""

    def __init__(self, root: str, consumer_id: str) -> None:
        self.root = root
        self.consumer_id = consumer_id
        make_dirs(root, STATE_SUBDIR)
        self.dir = Path(root) / STATE_SUBDIR
        lock = self.dir / f"{consumer_id}.lock"
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.intents = intents.IntentSlots(self.dir, consumer_id)
        fsync_dir(self.dir)  # the slots must exist on disk before a record in them counts
        self.locks = Locks(root)

    def close(self) -> None:
        """Release the liveness lock, then the partitions; the intent stays unless it is `done`.

        In that order: a next owner waits for a partition's lock and then recovers the intents
        of dead consumers (Sink.assign). Were the partitions released first, it could find
        this process still alive, leave a committed intent alone and load a stale state.
        """
        self.intents.close(remove=self.pending() is None)
        with contextlib.suppress(OSError):
            os.unlink(self.dir / f"{self.consumer_id}.lock")
        os.close(self._lock_fd)
        self.locks.close()

    def pending(self) -> str | None:
        """Return the phase of this process's unfinished intent (`write` or `commit`), None if none."""
        latest = self.intents.latest
        phase = None if latest is None else latest.get("phase")
        return None if phase == "done" else phase

    # -- partition state -------------------------------------------------------------------
    def load(self, topic: str, partition: int) -> PartitionState:
        """Read a partition's state; a missing or unreadable file means 'nothing known'."""
        path = self.dir / state_name(topic, partition)
        try:
            return PartitionState.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return PartitionState()
        except (ValueError, TypeError, KeyError, IndexError, OSError) as exc:
            log.error("state %s unreadable (%s): starting that partition from the group offset", path, exc)
            return PartitionState()

    def save_states(self, states: dict[str, PartitionState]) -> None:
        """Replace several partition state files, one directory fsync at the end."""
        replace_all((self.dir / name, state.dumps().encode()) for name, state in states.items())

    # -- intent ------------------------------------------------------------------------------
    def begin(self, files: dict[str, tuple[int, int]]) -> None:
        """Record, durably, each target file's size and the length about to be appended."""
        self.intents.write({"consumer": self.consumer_id, "phase": "write", "files": files})

    def commit(self, files: dict[str, tuple[int, int]], states: dict[str, PartitionState]) -> None:
        """Mark the appended data as complete: from here on recovery rolls forward."""
        head = json.dumps({"consumer": self.consumer_id, "phase": "commit", "files": files})
        encoded = ", ".join(f"{json.dumps(name)}: {s.dumps()}" for name, s in states.items())
        body = f'{head[:-1]}, "states": {{{encoded}}}}}'.encode()
        self.intents.write_raw(body, {"phase": "commit", "files": files})

    def finish(self, states: dict[str, PartitionState]) -> None:
        """Apply the committed states and drop the intent."""
        self.save_states(states)
        self.clear()

    def clear(self) -> None:
        """Mark our intent done (after apply or after an in-process rollback)."""
        self.intents.write({"consumer": self.consumer_id, "phase": "done"})

    # -- recovery ----------------------------------------------------------------------------
    def dead_write_intent_for(self, rels: Iterable[str]) -> bool:
        """Tell whether a dead consumer's intent in phase `write` names one of these files.

        Called with their file locks held, before appending: such an intent means torn bytes
        at the end of a file that must be undone first (locks.py). A live peer's latest record
        is never `write` while we hold the locks of its files: it holds them until `commit`
        or until its rollback is done.
        """
        wanted = set(rels)
        for owner, paths in self._intent_files().items():
            if owner == self.consumer_id or self._alive(owner):
                continue  # a live peer's slots may hold a large commit record: not read
            body = _read_intent(paths)
            if body is _UNREADABLE:
                return True  # let recover() deal with it
            writing = isinstance(body, dict) and body.get("phase") == "write"
            if writing and wanted & set(body.get("files") or ()):  # type: ignore[union-attr]
                return True
        return False

    def recover(self) -> list[str]:
        """Finish or undo the intents of dead consumer processes (and of our predecessors).

        Returns a description per intent handled (an intent that was `done` needs nothing and
        is only removed). Intents whose owner still holds its lock are left alone: that process
        is alive and will complete its own batch.
        """
        done: list[str] = []
        for owner, paths in sorted(self._intent_files().items()):
            if owner == self.consumer_id:
                continue
            lock_path = self.dir / f"{owner}.lock"
            try:
                lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("intent of %s belongs to a live consumer, left alone", owner)
                    continue
                handled = self._recover_one(owner, _read_intent(paths))
                if handled:
                    done.append(handled)
                for path in [*paths, lock_path]:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                fsync_dir(str(self.dir))
            finally:
                os.close(lock_fd)
        return done

    def _alive(self, owner: str) -> bool:
        """Tell whether the owner of intents still holds its liveness lock (a quick test)."""
        try:
            fd = os.open(self.dir / f"{owner}.lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also drops the lock we may have taken
        return False

    def _intent_files(self) -> dict[str, list[Path]]:
        """Every consumer's intent files by owner: its two slots, or a `.intent.json` of old."""
        found: dict[str, list[Path]] = {}
        for path in self.dir.iterdir():
            if path.name.endswith(LEGACY_SUFFIX):
                owner: str | None = path.name[: -len(LEGACY_SUFFIX)]
            else:
                owner = intents.owner_of(path)
            if owner:
                found.setdefault(owner, []).append(path)
        return found

    def _recover_one(self, owner: str, body: object) -> str | None:
        if body is _UNREADABLE or not isinstance(body, dict):
            if body is None:
                return None  # no record (died before its first batch) or only torn ones
            log.error("intent of %s unreadable: removed; its batch may repeat", owner)
            return f"{owner}: unreadable"
        try:
            phase = body["phase"]
            if phase == "done":
                return None
            files = {str(k): (int(v[0]), int(v[1])) for k, v in body["files"].items()}
            states = (
                {str(k): PartitionState.from_json(v) for k, v in body["states"].items()}
                if phase == "commit"
                else {}
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            log.error("intent of %s unreadable (%s): removed; its batch may repeat", owner, exc)
            return f"{owner}: unreadable"
        if phase == "commit":
            self.save_states(states)
            log.warning("recovered intent of %s: rolled forward %d partition states", owner, len(states))
            return f"{owner}: rolled forward"
        self.locks.lock_files(files)  # nobody appends to these files while we undo
        try:
            for rel, (before, length) in files.items():
                self._rollback_file(rel, before, length)
        finally:
            self.locks.unlock_files()
        log.warning("recovered intent of %s: rolled back %d files", owner, len(files))
        return f"{owner}: rolled back"

    def _rollback_file(self, rel: str, before: int, length: int) -> None:
        try:
            fd, _ = open_beneath(self.root, rel, os.O_WRONLY)
        except FileNotFoundError:
            return
        except UnsafePathError as exc:  # an intent names only files we wrote: never follow links
            log.error("rollback of %s skipped: %s", rel, exc)
            return
        try:
            size = os.fstat(fd).st_size
            if size <= before:
                return
            if size > before + length:
                # Someone else appended after us (a file shared by partitions of two consumers):
                # cutting would destroy their lines, so we keep ours and accept a duplicate.
                log.error(
                    "rollback of %s skipped: it grew beyond our append (%d > %d)", rel, size, before + length
                )
                return
            os.ftruncate(fd, before)
            os.fsync(fd)
        finally:
            os.close(fd)


LEGACY_SUFFIX = ".intent.json"  # the whole intent in one file, replaced atomically (before intents.py)
_UNREADABLE = object()


def _read_intent(paths: list[Path]) -> object:
    """Return the latest record among an owner's intent files: a dict, None (none) or _UNREADABLE.

    Slots (intents.py) hold a torn record at worst, which is skipped; a legacy JSON file was
    replaced atomically, so one that does not parse is reported unreadable.
    """
    legacy = [p for p in paths if p.name.endswith(LEGACY_SUFFIX)]
    if legacy:
        try:
            body = json.loads(legacy[0].read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return _UNREADABLE
        return body if isinstance(body, dict) else _UNREADABLE
    return intents.read_latest(paths)

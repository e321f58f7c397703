"""Durable per-partition state and the write-ahead intent that keeps it consistent with data.

Protocol of one batch (see README.md):
1. intent `write`: for every target file its size before the append (atomic replace + fsync);
2. append + fsync the data files;
3. intent `commit`: the new state of every partition in the batch;
4. replace each partition state file, then remove the intent;
5. commit the offsets to Kafka (informational: the state file is authoritative).
A crash in 1-2 is undone by truncating the files back (rollback); a crash in 3-4 is completed
from the intent (roll forward). Each consumer process holds an flock on its own lock file for its
lifetime so that a peer recovers only the intents of dead processes.
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

from keplerlog.durable import atomic_write, fsync_dir
from keplerlog.paths import UnsafePathError, make_dirs, open_beneath

from . import coverage
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
        self.intent_path = self.dir / f"{consumer_id}.intent.json"
        lock = self.dir / f"{consumer_id}.lock"
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.locks = Locks(root)

    def close(self) -> None:
        """Release the liveness lock (the intent, if any, stays for recovery)."""
        self.locks.close()
        with contextlib.suppress(OSError):
            os.unlink(self.dir / f"{self.consumer_id}.lock")
        os.close(self._lock_fd)

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
        body = {"consumer": self.consumer_id, "phase": "write", "files": files}
        atomic_write(self.intent_path, json.dumps(body).encode())

    def commit(self, files: dict[str, tuple[int, int]], states: dict[str, PartitionState]) -> None:
        """Mark the appended data as complete: from here on recovery rolls forward."""
        head = json.dumps({"consumer": self.consumer_id, "phase": "commit", "files": files})
        encoded = ", ".join(f"{json.dumps(name)}: {s.dumps()}" for name, s in states.items())
        atomic_write(self.intent_path, f'{head[:-1]}, "states": {{{encoded}}}}}'.encode())

    def finish(self, states: dict[str, PartitionState]) -> None:
        """Apply the committed states and drop the intent."""
        self.save_states(states)
        self.clear()

    def clear(self) -> None:
        """Remove our intent (after apply or after an in-process rollback)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.intent_path)
        fsync_dir(str(self.dir))

    # -- recovery ----------------------------------------------------------------------------
    def dead_write_intent_for(self, rels: Iterable[str]) -> bool:
        """Tell whether a dead consumer's intent in phase `write` names one of these files.

        Called with their file locks held, before appending: such an intent means torn bytes
        at the end of a file that must be undone first (locks.py).
        """
        wanted = set(rels)
        for intent in self.dir.glob("*.intent.json"):
            if intent.name == self.intent_path.name:
                continue
            try:
                body = json.loads(intent.read_bytes())
            except FileNotFoundError:
                continue
            except ValueError:
                return True  # unreadable: let recover() deal with it
            if body.get("phase") == "write" and wanted & set(body.get("files") or ()):
                return True
        return False

    def recover(self) -> list[str]:
        """Finish or undo the intents of dead consumer processes (and of our predecessors).

        Returns a description per intent handled. Intents whose owner still holds its lock
        are left alone: that process is alive and will complete its own batch.
        """
        done: list[str] = []
        for intent in sorted(self.dir.glob("*.intent.json")):
            owner = intent.name[: -len(".intent.json")]
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
                    log.info("intent %s belongs to a live consumer, left alone", intent.name)
                    continue
                if not intent.exists():
                    continue
                done.append(self._recover_one(intent))
                os.unlink(intent)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock_path)
                fsync_dir(str(self.dir))
            finally:
                os.close(lock_fd)
        return done

    def _recover_one(self, intent: Path) -> str:
        try:
            body = json.loads(intent.read_bytes())
            files = {str(k): (int(v[0]), int(v[1])) for k, v in body["files"].items()}
            phase = body["phase"]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log.error("intent %s unreadable (%s): removed; its batch may repeat", intent, exc)
            return f"{intent.name}: unreadable"
        if phase == "commit":
            states = {str(k): PartitionState.from_json(v) for k, v in body["states"].items()}
            self.save_states(states)
            log.warning("recovered intent %s: rolled forward %d partition states", intent.name, len(states))
            return f"{intent.name}: rolled forward"
        self.locks.lock_files(files)  # nobody appends to these files while we undo
        try:
            for rel, (before, length) in files.items():
                self._rollback_file(rel, before, length)
        finally:
            self.locks.unlock_files()
        log.warning("recovered intent %s: rolled back %d files", intent.name, len(files))
        return f"{intent.name}: rolled back"

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

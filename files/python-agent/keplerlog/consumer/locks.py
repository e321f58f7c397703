"""One writer per file and per partition, across processes and hosts sharing one data root.

Two kinds of `flock` below `{root}/.keplerlog/locks/` (the file system must provide `flock`
across hosts: local disks; NFS v4 emulates it with POSIX locks):

* **File locks** (`files-NNN`, a file's path hashed into 256 buckets): held exclusively by a
  consumer from the moment it takes the sizes of a batch's target files until that batch's
  intent is in phase `commit`. Files that several partitions feed (quarantine, legacy, a flat
  layout, records keyed elsewhere) therefore get whole batches one after the other; a disk-full
  rollback truncates only bytes of the batch holding the lock; and a consumer that died
  mid-append left its intent in phase `write`, which the next holder of that file's lock sees
  and undoes *before* appending (nobody can have appended after the torn bytes). Buckets are
  always taken in ascending order, so two batches never wait for each other in a cycle.
* **Partition locks** (`<topic>-partition-<n>`): held by the consumer that writes a partition's
  records and state, from assignment to revocation. A consumer that lost a partition while
  stalled (past `max_poll_interval_ms`) still holds it, so the new owner waits until the old one
  lets go and then loads the state including the old owner's last batch; once let go, the old
  owner can no longer write or save state for that partition (its records are dropped,
  uncommitted, and read again by the owner).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import zlib
from collections.abc import Iterable

from keplerlog.paths import make_dirs

log = logging.getLogger(__name__)

LOCK_SUBDIR = ".keplerlog/locks"
BUCKETS = 256


def bucket(rel: str) -> int:
    """Return the file-lock bucket of a relative path (the same in every process and host)."""
    return zlib.crc32(rel.encode("utf-8", "surrogateescape")) % BUCKETS


class Locks:
    """The file and partition locks of one consumer process (descriptors kept open)."""

    def __init__(self, root: str) -> None:
        make_dirs(root, LOCK_SUBDIR)
        self.dir = os.path.join(root, LOCK_SUBDIR)
        self._fds: dict[str, int] = {}
        self._held_files: list[str] = []
        self.partitions: set[tuple[str, int]] = set()

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            fd = os.open(os.path.join(self.dir, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._fds[name] = fd
        return fd

    # -- file locks ---------------------------------------------------------------------------
    def lock_files(self, rels: Iterable[str]) -> None:
        """Take the exclusive locks of these files' buckets, in ascending order (blocking)."""
        assert not self._held_files, "file locks are taken once per batch"
        for b in sorted({bucket(rel) for rel in rels}):
            name = f"files-{b:03d}"
            fcntl.flock(self._fd(name), fcntl.LOCK_EX)
            self._held_files.append(name)

    def unlock_files(self) -> None:
        """Release the file locks of the current batch."""
        while self._held_files:
            fcntl.flock(self._fds[self._held_files.pop()], fcntl.LOCK_UN)

    @property
    def holding_files(self) -> bool:
        """Tell whether this process holds file locks now (a batch is being appended)."""
        return bool(self._held_files)

    # -- partition locks ----------------------------------------------------------------------
    def try_partition(self, topic: str, partition: int) -> bool:
        """Take a partition's lock if free (or already ours); never waits."""
        if (topic, partition) in self.partitions:
            return True
        try:
            fcntl.flock(self._fd(f"{topic}-partition-{partition}"), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.partitions.add((topic, partition))
        return True

    def wait_partition(self, topic: str, partition: int, log_every_s: float = 10.0) -> None:
        """Take a partition's lock, waiting for a previous owner that has not let go yet."""
        started = time.monotonic()
        said = started
        while not self.try_partition(topic, partition):
            now = time.monotonic()
            if now - said >= log_every_s:
                log.warning(
                    "partition %s-%d still locked by its previous owner after %.0fs (a stalled consumer?)",
                    topic,
                    partition,
                    now - started,
                )
                said = now
            time.sleep(0.1)
        if time.monotonic() - started > 0.5:
            log.info(
                "partition %s-%d: previous owner let go after %.1fs",
                topic,
                partition,
                time.monotonic() - started,
            )

    def release_partition(self, topic: str, partition: int) -> None:
        """Let a partition go (after revocation: everything written for it is durable)."""
        if (topic, partition) in self.partitions:
            self.partitions.discard((topic, partition))
            fcntl.flock(self._fds[f"{topic}-partition-{partition}"], fcntl.LOCK_UN)

    def close(self) -> None:
        """Release everything (process exit releases it too)."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._held_files.clear()
        self.partitions.clear()

"""File identity: which file is which, across renames, restarts and inode reuse.

A path is not an identity (rotation moves files) and an inode alone is not either (the
file system reuses the inode of a deleted file at once). We use device + inode *plus* a
fingerprint: a hash of the file's first bytes (up to FINGERPRINT_BYTES). The fingerprint
grows with the file until it covers FINGERPRINT_BYTES, so it is stored with its length and a
later check hashes exactly that many bytes. A changed fingerprint on the same inode means the
file was truncated and rewritten (copytruncate) or the inode was reused.

The id sent in `kl.file` is minted once when the agent first sees a file and kept in the
state file; a file whose content restarts at offset 0 (truncation) always gets a new id so the
consumer, which drops records at offsets it has already seen for an id, never mistakes new
lines for replays.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

try:
    # hashlib.blake2b *is* this, CPython's own BLAKE2; but importing hashlib loads OpenSSL's
    # libcrypto for its other algorithms, ~3.7 MB of the agent's resident set (nothing else in
    # the librdkafka agent loads it). An interpreter built without _blake2 gets hashlib's.
    from _blake2 import blake2b
except ImportError:  # pragma: no cover
    from hashlib import blake2b

FINGERPRINT_BYTES = 1024

FileKey = tuple[int, int]  # (st_dev, st_ino): how the agent keys the files it follows or remembers


def fingerprint_of(data: bytes) -> str:
    """Hash of a file prefix (short: it is stored in the state file for every file)."""
    return blake2b(data, digest_size=12).hexdigest()


def read_prefix(fd: int, length: int) -> bytes:
    """Read the first `length` bytes of an open file without moving its offset."""
    out = b""
    while len(out) < length:
        chunk = os.pread(fd, length - len(out), len(out))
        if not chunk:
            break
        out += chunk
    return out


def new_file_id(dev: int, ino: int) -> str:
    """Mint a `kl.file` id: device and inode (readable in debugging) plus first-seen time.

    The time part makes ids unique when an inode is reused; it is only ever compared for
    equality, never parsed.
    """
    return f"{dev:x}.{ino:x}.{time.time_ns() // 1000:x}"


@dataclass(slots=True)
class Fingerprint:
    """Hash of the first `length` bytes of a file; `length` grows up to FINGERPRINT_BYTES."""

    length: int = 0
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = fingerprint_of(b"")

    @property
    def complete(self) -> bool:
        """True once the fingerprint covers FINGERPRINT_BYTES (it never changes again)."""
        return self.length >= FINGERPRINT_BYTES

    @classmethod
    def of(cls, prefix: bytes) -> Fingerprint:
        """Fingerprint a file's first bytes, `prefix` (at most FINGERPRINT_BYTES of them)."""
        return cls(len(prefix), fingerprint_of(prefix))

    @classmethod
    def of_fd(cls, fd: int, limit: int = FINGERPRINT_BYTES) -> Fingerprint:
        """Fingerprint the first min(size, limit) bytes of an open file."""
        return cls.of(read_prefix(fd, min(limit, FINGERPRINT_BYTES)))

    def matches_fd(self, fd: int) -> bool:
        """Tell whether the open file still starts with the bytes this fingerprint covers."""
        data = read_prefix(fd, self.length)
        return len(data) == self.length and fingerprint_of(data) == self.digest


@dataclass(frozen=True, slots=True)
class TailMark:
    """Hash of the `length` bytes just before offset `end`: what a restart checks them against.

    The fingerprint covers a file's first bytes only, so a file rewritten while the agent was
    stopped (or the file closed for idleness) that keeps them (a banner, a CSV header) and has
    grown past the saved offset looked exactly like the file the agent left. The bytes before the
    saved offset almost never survive such a rewrite (log lines differ in their timestamps).
    `length` 0: nothing to check (offset 0, or a mark saved before marks existed).
    """

    end: int = 0
    length: int = 0
    digest: str = ""

    @classmethod
    def of(cls, data: bytes, end: int) -> TailMark:
        """Mark the bytes `data`, which end at offset `end`."""
        return cls(end, len(data), fingerprint_of(data))

    def matches_fd(self, fd: int) -> bool:
        """Tell whether the open file still holds the marked bytes before `end`."""
        if not self.length:
            return True
        data = os.pread(fd, self.length, self.end - self.length)
        return len(data) == self.length and fingerprint_of(data) == self.digest


@dataclass(slots=True)
class FileIdentity:
    """Everything that identifies one log file: device, inode, fingerprint and minted id."""

    file_id: str
    dev: int
    ino: int
    fingerprint: Fingerprint

    def same_inode(self, st: os.stat_result) -> bool:
        """Tell whether a stat result has the same device and inode (necessary, not sufficient)."""
        return st.st_dev == self.dev and st.st_ino == self.ino

"""Read one day's report files, refusing what is not a plain, well-formed report.

The reports live in the shared data root; a file there may have been edited, truncated by a
full disk or replaced by a symlink to a device. Each problem is a LoadError naming the file, so
the audit can say which one and stop, rather than report a completeness it did not check.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .report import AUDIT_DIR, MAX_REPORT_BYTES, Report, ReportError, parse


class LoadError(Exception):
    """A report file cannot be used; the message names it and says why, on one line."""


def day_dir(root: str, day: str) -> Path:
    """Return the directory of one day's reports."""
    return Path(root, AUDIT_DIR, day)


def load_day(root: str, day: str) -> list[Report]:
    """Read every `*.json` report of `day` (none: an empty list; a bad one: LoadError)."""
    directory = day_dir(root, day)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LoadError(f"{directory}: {exc.strerror or exc}") from None
    return [
        _read(directory / name, day) for name in names if name.endswith(".json") and not name.startswith(".")
    ]


def _read(path: Path, day: str) -> Report:
    """Read one report: a regular file (no symlink, no device), at most MAX_REPORT_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        why = "a symlink" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise LoadError(f"report {path}: {why}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LoadError(f"report {path}: not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_REPORT_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise LoadError(f"report {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        return parse(b"".join(chunks), day)
    except ReportError as exc:
        raise LoadError(f"report {path}: {exc}") from None

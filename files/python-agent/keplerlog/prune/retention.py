"""Find day files by the layout regex, decide by the date in the name, delete or compress.

The date in the name (not mtime) decides, because a late or replayed record appends to an old
day file and refreshes its mtime. Only paths that fully match the layout (or the quarantine
layout) are touched; symlinks are never followed nor deleted; the walk stays inside root.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from keplerlog import daylock
from keplerlog.audit.report import AUDIT_DIR
from keplerlog.durable import fsync_dir
from keplerlog.layout import QUARANTINE_DIR, STATE_DIR, Layout

log = logging.getLogger(__name__)

_QUARANTINE_RE = re.compile(rf"{QUARANTINE_DIR}/(?P<day>\d{{8}})(?P<ext>\.gz|\.zst)?")
SUFFIX = {"gzip": ".gz", "zstd": ".zst"}


@dataclass(frozen=True)
class DayFile:
    """A file recognised as written by the consumer."""

    rel: str
    day: dt.date
    ext: str  # "" or ".gz"/".zst"


def scan(root: str, layout: Layout) -> Iterator[DayFile]:
    """Yield the day files below root: regular files only, no symlinks, our dirs skipped."""
    real_root = os.path.realpath(root)
    rx = layout.regex()
    for dirpath, dirnames, filenames in os.walk(real_root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, real_root)
        if rel_dir == ".":
            rel_dir = ""
            dirnames[:] = [d for d in dirnames if d != STATE_DIR]
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            match = rx.fullmatch(rel) or _QUARANTINE_RE.fullmatch(rel)
            if not match:
                continue
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            try:
                day = dt.datetime.strptime(match["day"], "%Y%m%d").date()
            except ValueError:
                continue
            yield DayFile(rel, day, match["ext"] or "")


@dataclass
class Report:
    """What a run did (or would do in dry-run)."""

    deleted: int = 0
    compressed: int = 0
    kept: int = 0
    busy: int = 0  # due, but a consumer holds it open: retried on the next run
    errors: int = 0
    audit_days: int = 0  # daily audit report directories deleted with their day


def today(tz: ZoneInfo) -> dt.date:
    """Return the current date in the consumer's zone (the zone the file names use)."""
    return dt.datetime.now(tz).date()


def run(
    root: str,
    layout: Layout,
    days: int,
    *,
    dry_run: bool = False,
    compress_after: int | None = None,
    compression: str = "gzip",
    now: dt.date | None = None,
    tz: ZoneInfo | None = None,
) -> Report:
    """Delete day files older than `days`; compress closed days older than `compress_after`.

    A file dated D is deleted when D < today - days (today - days itself is kept), whether
    compressed or not; it is compressed when D < today - compress_after (and D < today).
    Either happens only under retention's exclusive lock (daylock.py): a file a consumer still
    holds open for appending is skipped and counted as busy.
    """
    current = now or today(tz or ZoneInfo("UTC"))
    delete_before = current - dt.timedelta(days=days)
    compress_before = None
    if compress_after is not None:
        compress_before = min(current, current - dt.timedelta(days=compress_after))
    report = Report()
    for item in sorted(scan(root, layout), key=lambda f: f.rel):
        full = os.path.join(root, item.rel)
        delete = item.day < delete_before
        squeeze = compress_before is not None and not item.ext and item.day < compress_before
        if not delete and not squeeze:
            report.kept += 1
            continue
        try:
            lock = daylock.try_lock_exclusive(full)
        except FileNotFoundError:
            continue  # removed meanwhile (another prune run, or compressed and unlinked)
        except OSError as exc:
            log.error("cannot lock %s: %s", item.rel, exc)
            report.errors += 1
            continue
        if lock is None:
            log.info("%s: a consumer has it open for appending; left for the next run", item.rel)
            report.busy += 1
            continue
        try:
            if delete:
                log.info(
                    "%s %s (day %s older than %d days)",
                    "would delete" if dry_run else "deleted",
                    item.rel,
                    item.day.isoformat(),
                    days,
                )
                if not dry_run:
                    os.unlink(full)
                report.deleted += 1
            else:
                log.info(
                    "%s %s -> %s%s",
                    "would compress" if dry_run else "compressed",
                    item.rel,
                    item.rel,
                    SUFFIX[compression],
                )
                if not dry_run:
                    compress(full, compression)
                report.compressed += 1
        except OSError as exc:
            log.error("cannot process %s: %s", item.rel, exc)
            report.errors += 1
        finally:
            os.close(lock)
    report.audit_days = prune_audit(root, delete_before, dry_run)
    return report


def prune_audit(root: str, before: dt.date, dry_run: bool = False) -> int:
    """Delete the daily audit reports of days before `before`; return how many days went.

    The reports (`.keplerlog/audit/YYYYMMDD/`) go with the day files they account for.
    Only directories named by a date, holding only regular `*.json` files, are removed: nothing
    else below the root is touched, and a symlink is never followed.
    """
    base = os.path.join(os.path.realpath(root), AUDIT_DIR)
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return 0  # no report yet (or no root): nothing to prune
    removed = 0
    for name in names:
        try:
            day = dt.datetime.strptime(name, "%Y%m%d").date()
        except ValueError:
            continue
        directory = os.path.join(base, name)
        if day >= before or os.path.islink(directory) or not os.path.isdir(directory):
            continue
        try:
            files = os.listdir(directory)
            if any(not f.endswith(".json") or os.path.islink(os.path.join(directory, f)) for f in files):
                log.warning("%s/%s holds other files than reports: left alone", AUDIT_DIR, name)
                continue
            log.info("%s audit reports of %s", "would delete" if dry_run else "deleted", name)
            if not dry_run:
                for f in files:
                    os.unlink(os.path.join(directory, f))
                os.rmdir(directory)
        except OSError as exc:
            log.error("cannot delete the audit reports of %s: %s", name, exc)
            continue
        removed += 1
    return removed


def compress(path: str, compression: str) -> str:
    """Compress `path` to path.gz/.zst atomically, then remove the original.

    If the target exists (a late line reopened an already compressed day), the new member is
    appended to a copy of it: concatenated gzip members / zstd frames decompress as one stream.
    The temp file starts with a dot so the layout regex never matches it.
    """
    target = path + SUFFIX[compression]
    directory, name = os.path.split(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            if os.path.exists(target):
                with open(target, "rb") as old:
                    shutil.copyfileobj(old, out, 1 << 20)
            with open(path, "rb") as src:
                if compression == "gzip":
                    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz:
                        shutil.copyfileobj(src, gz, 1 << 20)
                else:
                    import zstandard

                    zstandard.ZstdCompressor(level=3).copy_stream(src, out)
            out.flush()
            os.fsync(out.fileno())
        shutil.copymode(path, tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    os.unlink(path)
    fsync_dir(directory)
    return target

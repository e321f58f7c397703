"""`keplerlog-prune`: retention (and optional compression) of the consumer's day files."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from keplerlog.layout import DEFAULT_LAYOUT, Layout, LayoutError

from .retention import run


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 when done, 1 if some files could not be handled, 2 on bad usage."""
    parser = argparse.ArgumentParser(prog="keplerlog-prune", description=__doc__)
    parser.add_argument("--root", help="root directory of the day files")
    parser.add_argument("--days", type=int, required=True, help="keep this many days before today")
    parser.add_argument("--layout", help=f"layout template (default {DEFAULT_LAYOUT})")
    parser.add_argument("--config", help="consumer.yml to read root, layout and timezone from")
    parser.add_argument("--timezone", help="zone of the dates in file names (default UTC)")
    parser.add_argument("--dry-run", action="store_true", help="only log what would be done")
    parser.add_argument(
        "--compress-after",
        type=int,
        metavar="DAYS",
        help="compress day files older than DAYS (closed days only)",
    )
    parser.add_argument("--compression", choices=("gzip", "zstd"), default="gzip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)

    def fail(msg: str) -> int:
        print(f"keplerlog-prune: {msg}", file=sys.stderr)
        return 2

    root, layout_text, zone = args.root, args.layout, args.timezone
    if args.config:
        from keplerlog.consumer.config import ConfigError, load_storage

        try:
            config_root, config_layout, config_zone = load_storage(args.config)
        except ConfigError as exc:
            return fail(f"config error: {exc}")
        root = root or config_root
        layout_text = layout_text or config_layout.template
        zone = zone or config_zone
    if not root or not os.path.isdir(root):
        return fail(f"--root {root!r} is not a directory")
    if args.days < 0 or (args.compress_after is not None and args.compress_after < 1):
        return fail("--days must be >= 0 and --compress-after >= 1")
    try:
        layout = Layout(layout_text or DEFAULT_LAYOUT)
        tz = ZoneInfo(zone or "UTC")
    except (LayoutError, ZoneInfoNotFoundError, ValueError) as exc:
        return fail(str(exc))
    if args.compression == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            return fail("--compression zstd needs the zstandard module")
    report = run(
        root,
        layout,
        args.days,
        dry_run=args.dry_run,
        compress_after=args.compress_after,
        compression=args.compression,
        tz=tz,
    )
    logging.info(
        "prune %s: deleted=%d compressed=%d kept=%d busy=%d errors=%d audit_days=%d",
        "(dry run)" if args.dry_run else "",
        report.deleted,
        report.compressed,
        report.kept,
        report.busy,
        report.errors,
        report.audit_days,
    )
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())

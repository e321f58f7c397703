"""`keplerlog-audit --day YYYYMMDD`: how complete one day's logs are, from the consumer's reports.

Exit 0: every service/module and the whole day within the loss threshold and no agent silent;
1: a loss rate over the threshold or a silent agent (for an alert); 2: a usage error, an
unreadable report or no report for the day. Reads only; never writes anything.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date, datetime, timedelta
from typing import NoReturn

from . import render
from .load import LoadError, day_dir, load_day
from .report import is_day
from .summary import summarize

DEFAULT_THRESHOLD = 0.0001  # 0.01 %


class UsageError(Exception):
    """A problem with the command line or the root: one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        """Print `keplerlog-audit: <message>` and exit 2."""
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _day(text: str | None) -> str:
    if text is None:
        return (date.today() - timedelta(days=1)).strftime("%Y%m%d")
    try:
        if not is_day(text):
            raise ValueError
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        raise UsageError(f"--day {text!r} is not a date YYYYMMDD") from None
    return text


def _previous(day: str) -> str:
    return (datetime.strptime(day, "%Y%m%d") - timedelta(days=1)).strftime("%Y%m%d")


def _root(args: argparse.Namespace) -> str:
    root = args.root
    if root is None and args.config:
        from keplerlog.consumer.config import ConfigError, load_storage

        try:
            root = load_storage(args.config)[0]
        except ConfigError as exc:
            raise UsageError(f"config error: {exc}") from None
    if not root:
        raise UsageError("--root DIR (the consumer's data root) or --config consumer.yml is required")
    if not os.path.isdir(root):
        raise UsageError(f"--root {root!r} is not a directory")
    return str(root)


def _threshold(value: float) -> float:
    if not 0 <= value < 1:
        raise UsageError(f"--threshold {value} is not a rate in [0, 1) (0.0001 is 0.01 %)")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring for the exit codes."""
    parser = _Parser(prog="keplerlog-audit", description=__doc__)
    parser.add_argument("--root", help="the consumer's data root")
    parser.add_argument("--config", help="consumer.yml to read the root from (instead of --root)")
    parser.add_argument("--day", help="YYYYMMDD to audit (default: yesterday, local time)")
    parser.add_argument(
        "--threshold", type=float, default=DEFAULT_THRESHOLD, help="loss rate that fails (default 0.0001)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed): a return code
        return exc.code if isinstance(exc.code, int) else 2
    try:
        day = _day(args.day)
        threshold = _threshold(args.threshold)
        root = _root(args)
        today = load_day(root, day)
        if not today:
            raise UsageError(f"no reports for {day} in {day_dir(root, day)}")
        previous = _previous(day)
        yesterday = load_day(root, previous)
    except (UsageError, LoadError) as exc:
        print(f"keplerlog-audit: {render.printable(str(exc))}", file=sys.stderr)
        return 2
    findings = summarize(day, previous, threshold, today, yesterday)
    sys.stdout.write(render.as_json(findings) if args.json else render.text(findings, root))
    return 0 if findings.ok else 1


if __name__ == "__main__":
    sys.exit(main())

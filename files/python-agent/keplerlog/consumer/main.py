"""`keplerlog-consumer --config consumer.yml`: Kafka topic -> day files."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from .app import ConsumerApp
from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit 0 on SIGTERM/SIGINT after the current batch, 2 on bad config."""
    parser = argparse.ArgumentParser(prog="keplerlog-consumer", description=__doc__)
    parser.add_argument("--config", help="YAML config (see docs/interfaces.md)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"keplerlog-consumer: config error: {exc}", file=sys.stderr)
        return 2
    try:
        app = ConsumerApp(config)
    except OSError as exc:
        print(f"keplerlog-consumer: cannot use root {config.root}: {exc}", file=sys.stderr)
        return 2

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("signal %d: finishing the current batch", signum)
        app.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

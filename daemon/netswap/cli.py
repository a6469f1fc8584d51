"""The `netswapd` command line: run the daemon, or check a config file."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import ConfigError, load

DEFAULT_CONFIG = "config/netswapd.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netswapd", description="Serve swap space to diskless nodes over NBD."
    )
    parser.add_argument("--version", action="version", version=f"netswapd {__version__}")
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"config file (default: {DEFAULT_CONFIG})"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="run the daemon (the default)")
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("path", help="the config file to check")
    reserve = commands.add_parser(
        "reserve", help="print the reservation tree and the pool it sizes, and exit"
    )
    reserve.add_argument("--config", dest="reserve_config", default=None,
                         help="config file (default: the global --config)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        path = args.path
    elif args.command == "reserve" and args.reserve_config:
        path = args.reserve_config
    else:
        path = args.config
    try:
        config = load(path)
    except ConfigError as exc:
        print(f"netswapd: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{path}: ok ({len(config.exports)} static exports)")
        return 0
    # Importing the daemon loads the C pool; check-config needs neither.
    from .daemon import reserve_report, run
    from .protect import ProtectError

    if args.command == "reserve":
        # The report says what protection took effect; the module's own log lines would
        # only repeat it on stderr.
        logging.getLogger("netswap").setLevel(logging.ERROR)
        try:
            print(reserve_report(config))
        except (ConfigError, ProtectError) as exc:
            print(f"netswapd: {exc}", file=sys.stderr)
            return 2
        return 0
    return run(config)


if __name__ == "__main__":
    sys.exit(main())

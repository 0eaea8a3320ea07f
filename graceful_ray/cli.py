"""`graceful-ray`: the command line.

Each sub-command lives beside the code it drives (``graceful_ray/<part>/cli.py``
exposes ``add_parser(subparsers)``), so this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from graceful_ray.errors import GracefulRayError

# (module, summary) for each sub-command group; a module that is not there yet
# simply does not contribute its command.
_COMMANDS = [
    "graceful_ray.data.cli",
    "graceful_ray.registry.cli",
    "graceful_ray.train.cli",
    "graceful_ray.evaluate",
    "graceful_ray.tune.cli",
    "graceful_ray.serve.cli",
    "graceful_ray.retrieval.cli",
    "graceful_ray.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graceful-ray",
        description=(
            "Graceful model upgrades on Ray: train a new model compatible with the "
            "old one, search the accuracy / flip-rate trade-off, shadow it on live "
            "traffic and cut over behind gates."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except GracefulRayError as e:
        # Expected bad input: one clear line, no traceback.
        print(f"graceful-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`graceful-ray`: the command line.

Each sub-command lives beside the code it drives (``graceful_ray/<part>/cli.py``
exposes ``add_parser(subparsers)``), so this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from graceful_ray.errors import GracefulRayError

# command -> the module whose add_parser() adds it; a module that is not there
# yet simply does not contribute its command.
COMMANDS = {
    "data": "graceful_ray.data.cli",
    "registry": "graceful_ray.registry.cli",
    "train": "graceful_ray.train.cli",
    "evaluate": "graceful_ray.evaluate",
    "tune": "graceful_ray.tune.cli",
    "interpolate": "graceful_ray.interpolate",
    "serve": "graceful_ray.serve.cli",
    "shadow": "graceful_ray.serve.cli",
    "gallery": "graceful_ray.retrieval.cli",
    "demo": "graceful_ray.demo",
}
_COMMANDS = list(dict.fromkeys(COMMANDS.values()))


def command_of(argv: list[str]) -> str | None:
    """The sub-command ``argv`` names, if it names one (options before it skipped)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-v", "--verbose", action="store_true")
    add_root_argument(pre)
    pre.add_argument("command", nargs="?")
    known, _ = pre.parse_known_args(argv)
    return known.command if known.command in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI, or with ``command`` only that command's parser.

    Some command modules import torch (evaluate, interpolate) or pandas and
    pyarrow.dataset (data, tune) at their top: importing all of them to parse
    one command took seconds, and a command must refuse bad arguments at
    once, so ``main`` imports only the module of the command it runs.
    """
    parser = argparse.ArgumentParser(
        prog="graceful-ray",
        description=(
            "Graceful model upgrades on Ray: train a new model compatible with the "
            "old one, search the accuracy / flip-rate trade-off, shadow it on live "
            "traffic and cut over behind gates."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_root_argument(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in [COMMANDS[command]] if command else _COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.add_parser(sub)
    _root_everywhere(sub)
    return parser


def _root_everywhere(subparsers_action) -> None:
    """``--root`` after any sub-command too (``graceful-ray train --root R``), unless
    the command has its own (the demo's means the same)."""
    for p in set(subparsers_action.choices.values()):
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            for n in nested:
                _root_everywhere(n)
        elif "--root" not in p._option_string_actions:
            p.add_argument("--root", dest="shared_root", metavar="ROOT", default=argparse.SUPPRESS,
                           help=ROOT_HELP)


ROOT_HELP = ("storage root shared by every stage: a local path, an NFS mount, s3:// or gs://. The registry is "
             "ROOT/registry, Train runs ROOT/runs, Tune runs ROOT/tune, shadow logs ROOT/shadow, reports "
             "ROOT/reports (default $GRACEFUL_RAY_ROOT, else ./.graceful-ray); an explicit --registry or "
             "--storage still wins")


def add_root_argument(parser: argparse.ArgumentParser) -> None:
    """``--root``: the one storage root through which separate stages (and Ray
    jobs) find each other's outputs."""
    parser.add_argument("--root", dest="shared_root", metavar="ROOT", default=None, help=ROOT_HELP)


def apply_root(root: str | None) -> None:
    """Make ``root`` the default of every command (they read ``$GRACEFUL_RAY_ROOT``)."""
    if root:
        os.environ["GRACEFUL_RAY_ROOT"] = root if "://" in root else os.path.abspath(root)


def run_job(command: list[str], parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """A ``jobs/*.py`` entrypoint: ``parser`` (the command's own options plus
    ``--root``) parses first, so ``--help`` documents the job and bad options
    fail before anything runs; then the same code as ``graceful-ray COMMAND``."""
    add_root_argument(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    only_root = argparse.ArgumentParser(add_help=False)
    add_root_argument(only_root)
    _, rest = only_root.parse_known_args(argv)
    return main([*(["--root", args.shared_root] if args.shared_root else []), *command, *rest])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        # no known command: all of them, for --help and the error. Building a parser
        # reads the method declarations, which a bad $GRACEFUL_RAY_METHOD_MODULES breaks.
        parser = build_parser(command_of(argv))
    except GracefulRayError as e:
        return _refuse(e)
    args = parser.parse_args(argv)
    apply_root(args.shared_root)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except GracefulRayError as e:
        return _refuse(e)


def _refuse(e: GracefulRayError) -> int:
    """Expected bad input: one clear line, no traceback, exit status 2."""
    print(f"graceful-ray: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

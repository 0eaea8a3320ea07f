"""`graceful-ray registry ...`: list models, show a manifest, move an alias."""

from __future__ import annotations

import argparse
import os

DEFAULT_ROOT = "$GRACEFUL_RAY_ROOT/registry"


def default_root() -> str:
    """The registry every command shares: ``$GRACEFUL_RAY_ROOT/registry`` (the
    project root defaults to ``./.graceful-ray``), the same place ``train`` and
    ``tune`` publish to."""
    from graceful_ray.train.config import default_root as project_root

    return os.path.join(project_root(), "registry")


def _registry(args: argparse.Namespace):
    from graceful_ray.registry.store import Registry

    return Registry(args.registry or default_root())


def _cmd_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    names = reg.list_models()
    if not names:
        print(f"no models in {reg.uri}")
    for name in names:
        versions = reg.versions(name)
        aliases = reg.aliases(name)
        latest = versions[-1]
        alias_txt = ", ".join(f"{a}->v{v}" for a, v in aliases.items()) or "-"
        print(f"{name}\tversions: {', '.join(f'v{m.version}' for m in versions)}\t"
              f"latest: v{latest.version} ({latest.method}, {latest.created_at})\t"
              f"aliases: {alias_txt}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    print(_registry(args).get(args.ref).to_json())
    return 0


def _cmd_alias(args: argparse.Namespace) -> int:
    reg = _registry(args)
    manifest = reg.set_alias(args.name, args.alias, args.version)
    previous = reg.alias_record(args.name, args.alias).get("previous")
    print(f"{args.name}@{args.alias} -> v{manifest.version}"
          + (f" (was v{previous})" if previous is not None else " (new alias)"))
    return 0


def add_parser(subparsers) -> None:
    """Add the ``registry`` command group to the top-level CLI."""
    parser = subparsers.add_parser(
        "registry", help="inspect the model registry and move aliases",
        description="Inspect the model registry and move aliases. The root defaults to "
                    "$GRACEFUL_RAY_ROOT/registry ($GRACEFUL_RAY_ROOT defaults to ./.graceful-ray).")
    sub = parser.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    root_help = "registry root (local path, s3:// or gs:// URI)"

    p = sub.add_parser("list", help="models with their versions and aliases")
    p.add_argument("--registry", default=None, help=root_help)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("show", help="print a version's manifest as JSON")
    p.add_argument("ref", metavar="REF", help="name, name@latest, name@v3, name@3 or name@alias")
    p.add_argument("--registry", default=None, help=root_help)
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("alias", help="point an alias (e.g. production) at a version")
    p.add_argument("name", metavar="NAME")
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("version", metavar="VERSION", help="3, v3, latest or another alias")
    p.add_argument("--registry", default=None, help=root_help)
    p.set_defaults(func=_cmd_alias)

"""`graceful-ray registry ...`: list models, show a manifest, move an alias, import a
model trained elsewhere, export a version for the team's own stack."""

from __future__ import annotations

import argparse

from graceful_ray.keyvalue import parse_kv
from graceful_ray.paths import registry_root
from graceful_ray.registry.exporter import export_model
from graceful_ray.registry.importer import import_model
from graceful_ray.registry.store import Registry

DEFAULT_ROOT = "$GRACEFUL_RAY_ROOT/registry"


def _registry(args: argparse.Namespace):
    return Registry(registry_root(args.registry))


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


def _cmd_import(args: argparse.Namespace) -> int:
    r = import_model(args.name, factory=args.factory, weights=args.weights,
                     registry=registry_root(args.registry), classes=args.classes,
                     input_shape=args.input_shape, model_args=parse_kv(args.model_arg),
                     head_module=args.head_module, alias=args.alias, evaluate=args.evaluate)
    print(f"imported {r.ref}: {len(r.classes)} classes, embedding dim {r.embedding_dim}, "
          f"new embedding space {r.embedding_space}"
          + (f", alias {args.name}@{r.alias}" if r.alias else ""))
    if r.test_accuracy is not None:
        print(f"test accuracy on {args.evaluate}: {r.test_accuracy:.4f}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    r = export_model(args.ref, args.out, registry=registry_root(args.registry))
    print(f"exported {r.ref} to {r.out}: model.safetensors (loads into {r.factory} with strict=True)")
    if r.torchscript:
        print(f"model.torchscript.pt: {r.torchscript}" + (f" ({r.torchscript_note})" if r.torchscript_note else ""))
    else:
        print(f"no TorchScript file: {r.torchscript_note}")
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

    p = sub.add_parser(
        "import", help="publish a model trained elsewhere (your factory and weights)",
        description="Publish a model trained outside graceful-ray as a new version with its own "
                    "embedding space. The weights must fit the factory key for key; one forward "
                    "pass runs on a zero input before anything is published.")
    p.add_argument("name", metavar="NAME", help="registry model name")
    p.add_argument("--factory", required=True,
                   help="package.module:build returning your torch.nn.Module (with --head-module), or "
                        "a zoo name / graceful-ray factory returning an EmbeddingClassifier")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="keyword argument of the factory, e.g. hidden=64 (repeatable)")
    p.add_argument("--weights", required=True,
                   help=".safetensors, or a state dict saved with torch.save (.pt/.pth), read with "
                        "weights_only=True")
    p.add_argument("--head-module", help="the last linear layer of your network (e.g. fc, classifier.1): "
                                         "its input is the embedding")
    p.add_argument("--classes", nargs="+",
                   help="class id of each head output in order: 0-19, 0,1,2, or the dataset's class "
                        "names (with --evaluate); default: all classes of --evaluate DATA")
    p.add_argument("--input-shape", help="shape of one sample, e.g. 40 or 3,32,32 (default: that of "
                                         "--evaluate DATA)")
    p.add_argument("--alias", help="point this alias (e.g. production) at the new version")
    p.add_argument("--evaluate", metavar="DATA", help="a graceful-ray dataset: print the test accuracy")
    p.add_argument("--registry", default=None, help=root_help)
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser(
        "export", help="write a version as your own stack loads it (safetensors + TorchScript)",
        description="Write NAME@VERSION to DIR: model.safetensors in your factory's key names "
                    "(load_state_dict strict=True), model.torchscript.pt (scripted, else traced) "
                    "and export.json.")
    p.add_argument("ref", metavar="NAME@VERSION")
    p.add_argument("--out", required=True, metavar="DIR", help="an empty directory (local, s3:// or gs://)")
    p.add_argument("--registry", default=None, help=root_help)
    p.set_defaults(func=_cmd_export)

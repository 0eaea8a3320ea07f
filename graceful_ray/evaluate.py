"""`graceful-ray evaluate`: how an upgrade behaves, old model against new.

Runs both registered models over a split (in-process: evaluation sets are small;
the old-output cache and the gallery builder use Ray Data for the large passes)
and reports the flip metrics with Wilson intervals, the per-class flips and the
old/new confusion, and the cross-model retrieval scores with the compatibility
criterion ``M(new, old) > M(old, old)`` and, given a reference model trained
without compatibility, the update gain.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from graceful_ray.errors import ConfigError
from graceful_ray.metrics import compatibility_matrix, flip_report, is_compatible, m_score, update_gain
from graceful_ray.paths import registry_root, under_root
from graceful_ray.registry import load_model
from graceful_ray.storage import resolve
from graceful_ray.data import load_split
from graceful_ray.metrics.tables import format_generations, retrieval_table

logger = logging.getLogger(__name__)


@dataclass
class Predictions:
    ref: str
    embeddings: np.ndarray
    logits: np.ndarray
    pred: np.ndarray  # global class ids
    embedding_space: str


def predict(registry_root: str, ref: str, x: np.ndarray, batch_size: int = 2048) -> Predictions:
    """Embeddings, logits and decisions (global class ids) of a registered model."""

    manifest, model = load_model(registry_root, ref)
    model.eval()
    classes = np.asarray(manifest.classes)
    embs, logits = [], []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            e, l = model.forward_features(torch.as_tensor(np.ascontiguousarray(x[start:start + batch_size])))
            embs.append(e.numpy())
            logits.append(l.numpy())
    emb, lg = np.concatenate(embs), np.concatenate(logits)
    return Predictions(f"{manifest.name}@v{manifest.version}", emb, lg, classes[lg.argmax(1)],
                       manifest.embedding_space)


def evaluate_upgrade(data: str, old_ref: str, new_ref: str, *, registry_root: str, split: str = "test",
                     reference_ref: str | None = None, out_dir: str | None = None) -> dict[str, Any]:
    """The flip and compatibility report of ``new_ref`` against ``old_ref``."""

    x, y, info = load_split(data, split)
    old = predict(registry_root, old_ref, x)
    new = predict(registry_root, new_ref, x)
    report = flip_report(y, old.pred, new.pred, class_names=info.class_names)
    result: dict[str, Any] = {"old": old.ref, "new": new.ref, "split": split, "rows": int(len(y)),
                              "flips": report.to_dict()}
    retrieval: dict[str, Any] = {"m_old_old": m_score(old.embeddings, old.embeddings, y).to_dict(),
                                 "m_new_new": m_score(new.embeddings, new.embeddings, y).to_dict()}
    if new.embeddings.shape[1] == old.embeddings.shape[1]:
        m_no = m_score(new.embeddings, old.embeddings, y)
        retrieval["m_new_old"] = m_no.to_dict()
        mo = retrieval["m_old_old"]
        retrieval["compatible_top1"] = is_compatible(m_no.top1, mo["top1"])
        retrieval["compatible_map"] = is_compatible(m_no.map, mo["map"])
        if reference_ref:
            ref = predict(registry_root, reference_ref, x)
            m_ref = m_score(ref.embeddings, ref.embeddings, y)
            retrieval["reference"] = ref.ref
            retrieval["m_ref_ref"] = m_ref.to_dict()
            retrieval["update_gain_top1"] = update_gain(m_no.top1, mo["top1"], m_ref.top1)
            retrieval["update_gain_map"] = update_gain(m_no.map, mo["map"], m_ref.map)
    else:
        retrieval["m_new_old"] = None
        retrieval["note"] = (f"embedding dims differ ({new.embeddings.shape[1]} vs {old.embeddings.shape[1]}): "
                             "the new model cannot query the old gallery")
    retrieval["same_embedding_space"] = old.embedding_space == new.embedding_space
    result["retrieval"] = retrieval
    result["table"] = report.to_table() + "\n" + retrieval_table(retrieval)
    if out_dir:
        out = resolve(out_dir)
        out.makedirs()
        out.join("report.json").write_bytes(json.dumps({k: v for k, v in result.items() if k != "table"},
                                                       indent=2, default=float).encode())
        if out.is_local:
            report.save_png(out.join("flips.png").path)
            result["png"] = out.join("flips.png").path
        else:
            with tempfile.TemporaryDirectory() as tmp:
                report.save_png(os.path.join(tmp, "flips.png"))
                with open(os.path.join(tmp, "flips.png"), "rb") as f:
                    out.join("flips.png").write_bytes(f.read())
            result["png"] = out.join("flips.png").uri
        result["json"] = out.join("report.json").uri
    return result


def evaluate_generations(data: str, refs: list[str], *, registry_root: str, split: str = "test",
                         metrics: tuple[str, ...] = ("top1", "map")) -> dict[str, Any]:
    """The compatibility matrix ``M(v_i, v_j)`` of generations ``refs`` (oldest first), with AC and AM.

    Every model embeds the same split; models whose embeddings have another
    dimension than the first cannot query each other's galleries, so they are
    refused with the pair named rather than scored as zero.
    """

    if len(refs) < 2:
        raise ConfigError(f"--generations needs at least two models (oldest first), got {refs}")
    x, y, _ = load_split(data, split)
    preds = [predict(registry_root, ref, x) for ref in refs]
    dims = {p.ref: int(p.embeddings.shape[1]) for p in preds}
    if len(set(dims.values())) > 1:
        raise ConfigError(f"generations must share an embedding dimension to search each other's galleries: {dims}")
    result: dict[str, Any] = {"models": [p.ref for p in preds], "split": split, "rows": int(len(y)),
                              "spaces": {p.ref: p.embedding_space for p in preds}}
    for metric in metrics:
        result[metric] = compatibility_matrix([p.embeddings for p in preds], y, metric=metric,
                                              full=True).to_dict()
    return result


def run_evaluate(args: argparse.Namespace) -> int:
    registry = registry_root(args.registry)
    out = args.out or (under_root("reports", args.run_name) if args.run_name else None)
    if args.generations:
        if args.old or args.new:
            raise ConfigError("give either --old and --new, or --generations, not both")
        result = evaluate_generations(args.data, args.generations, registry_root=registry, split=args.split)
        print(f"compatibility of {len(result['models'])} generations on {args.split} ({result['rows']} rows)")
        print(format_generations(result))
        if out:
            loc = resolve(out)
            loc.makedirs()
            loc.join("generations.json").write_bytes(json.dumps(result, indent=1).encode())
            print(f"report: {loc.join('generations.json').uri}")
        return 0
    if not (args.old and args.new):
        raise ConfigError("evaluate needs --old and --new (or --generations REF REF ...)")
    result = evaluate_upgrade(args.data, args.old, args.new, registry_root=registry, split=args.split,
                              reference_ref=args.reference, out_dir=out)
    print(f"{result['new']} against {result['old']} on {args.split} ({result['rows']} rows)")
    print(result["table"])
    if out:
        print(f"report: {result['json']}\nplot:   {result['png']}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="flip and compatibility report of a new model against an old one",
        description="Compare two registered models on a dataset split: error rates, negative/positive "
                    "flip rates with 95% intervals, per-class flips, and cross-model retrieval. With "
                    "--generations, the compatibility matrix M(v_i, v_j) of several generations with AC and AM.")
    add_evaluate_arguments(p)
    p.set_defaults(func=run_evaluate)


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``graceful-ray evaluate`` and ``jobs/evaluate.py``."""
    p.add_argument("--data", required=True)
    p.add_argument("--old", help="NAME@VERSION or NAME@ALIAS")
    p.add_argument("--new", help="NAME@VERSION or NAME@ALIAS")
    p.add_argument("--generations", nargs="+", metavar="REF",
                   help="several models, oldest first (e.g. m@v1 m@v2 m@v3): print their compatibility matrix")
    p.add_argument("--reference", help="same architecture trained without compatibility, for the update gain")
    p.add_argument("--split", default="test")
    p.add_argument("--registry", help="registry root (default $GRACEFUL_RAY_ROOT/registry)")
    p.add_argument("--out", help="directory for the report (report.json and flips.png)")
    p.add_argument("--run-name", help="names the report: written to $GRACEFUL_RAY_ROOT/reports/<run-name> "
                                      "unless --out is given")

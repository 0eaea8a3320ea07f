"""`graceful-ray interpolate`: weight interpolation between v1 and v2, no retraining (BCWI).

Backward-compatible weight interpolation (Schumann et al., ICCV 2023): the
published upgrade is ``v2' = (1 - a) v1 + a v2``, tensor by tensor. Along the
segment the model moves from v1's decisions (``a = 0``, NFR 0 by definition) to
v2's (``a = 1``); when v2 was fine-tuned from v1 (``--init-from-old``) the two
share a basin and intermediate points keep most of v2's accuracy while
repeating more of v1's correct decisions. Models trained apart (different
seeds from scratch) sit in different basins: the midpoints then lose accuracy,
the rule below rejects them, and the step says that it does not help.

``a`` is chosen on the validation split, never the test split, from a grid:
the lowest NFR among the points whose accuracy is at least v2's minus
``max_accuracy_drop`` (0 by default: never less accurate than v2); ties go to
the larger ``a``. ``a = 1`` (v2 itself) always qualifies, so the result is never
worse than v2 on validation by this rule.

Head rows are interpolated for the classes both models know; rows of classes
only v2 has are v2's. Both must be plain networks of the same architecture.
The result is published as its own version with its lineage: parent v1,
``interpolated_from = {old, new, alpha}`` and the whole grid in the manifest.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from graceful_ray.data import load_split
from graceful_ray.errors import ConfigError
from graceful_ray.models import build_model
from graceful_ray.paths import registry_root
from graceful_ray.registry import Registry, load_model

logger = logging.getLogger(__name__)

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def interpolate_state(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], alpha: float,
                      old_classes: list[int], new_classes: list[int]) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * old + alpha * new`` per tensor; head rows matched by global class id."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"interpolation weight must be in [0, 1], got {alpha}")
    body = [k for k in new if not k.startswith("head.")]
    bad = [k for k in body if k not in old or tuple(old[k].shape) != tuple(new[k].shape)]
    if bad or set(old) - set(new):
        raise ConfigError(f"the two models do not share an architecture (tensors {bad[:4]} differ); "
                          "interpolation needs v2 trained with v1's --model and --model-arg")
    out = {k: ((1 - alpha) * old[k].float() + alpha * new[k].float()).to(new[k].dtype) for k in body}
    old_row = {int(c): j for j, c in enumerate(old_classes)}
    for k in ("head.weight", "head.bias"):
        if k not in new:
            continue
        rows = new[k].clone().float()
        for i, c in enumerate(new_classes):
            if int(c) in old_row:
                rows[i] = (1 - alpha) * old[k][old_row[int(c)]].float() + alpha * rows[i]
        out[k] = rows.to(new[k].dtype)
    return out


@dataclass
class GridPoint:
    alpha: float
    accuracy: float
    nfr: float
    negative_flips: int


@dataclass
class Interpolation:
    """The chosen point, the whole grid, and what was published (``None`` with ``publish=False``)."""

    alpha: float
    chosen: GridPoint
    grid: list[GridPoint]
    rule: str
    published: Any = None
    state_dict: dict = field(default_factory=dict, repr=False)

    @property
    def helps(self) -> bool:
        return self.alpha < 1.0


def choose_alpha(grid: list[GridPoint], max_accuracy_drop: float = 0.0) -> GridPoint:
    """Lowest NFR among points at least as accurate as v2 (``alpha = 1``) minus the drop; ties: larger alpha."""
    v2 = [g for g in grid if g.alpha == 1.0]
    if not v2:
        raise ConfigError("the interpolation grid must contain 1.0 (v2 itself), the accuracy reference")
    floor = v2[0].accuracy - float(max_accuracy_drop)
    pool = [g for g in grid if g.accuracy >= floor - 1e-12]
    return min(pool, key=lambda g: (g.nfr, -g.alpha))


def _outputs(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.as_tensor(np.ascontiguousarray(x[i:i + 4096]))).numpy()
                               for i in range(0, len(x), 4096)])


def interpolate(data: str, old_ref: str, new_ref: str, *, registry_root: str, split: str = "val",
                grid: tuple[float, ...] = DEFAULT_GRID, max_accuracy_drop: float = 0.0,
                name: str | None = None, publish: bool = True) -> Interpolation:
    """Evaluate ``(1 - a) old + a new`` on ``split`` for every ``a`` in ``grid``, choose one, publish it."""

    if split == "test":
        raise ConfigError("choose the interpolation weight on a validation split, not 'test'")
    if max_accuracy_drop < 0:
        raise ConfigError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}")
    grid = tuple(sorted({float(a) for a in grid} | {1.0}))
    if any(not 0.0 <= a <= 1.0 for a in grid):
        raise ConfigError(f"interpolation weights must be in [0, 1], got {list(grid)}")
    registry = Registry(registry_root)
    old_m, old_model = load_model(registry, old_ref)
    new_m, new_model = load_model(registry, new_ref)
    for m in (old_m, new_m):
        if m.format != "network":
            raise ConfigError(f"{m.ref} is stored as {m.format!r}; interpolation needs plain networks")
    spec = new_m.spec
    old_spec = old_m.architecture
    if {k: v for k, v in old_spec.items() if k != "num_classes"} != \
            {k: v for k, v in new_m.architecture.items() if k != "num_classes"}:
        raise ConfigError(f"{old_m.ref} and {new_m.ref} have different architectures ({old_spec} vs "
                          f"{new_m.architecture}); interpolation needs v2 trained with v1's model")

    x, y, info = load_split(data, split)
    old_pred = np.asarray(old_m.classes)[_outputs(old_model, x).argmax(1)]
    old_right = old_pred == y
    old_state, new_state = old_model.state_dict(), new_model.state_dict()
    classes = np.asarray(new_m.classes)
    points, states = [], {}
    probe = build_model(spec)
    for a in grid:
        state = interpolate_state(old_state, new_state, a, list(old_m.classes), list(new_m.classes))
        probe.load_state_dict(state)
        right = classes[_outputs(probe, x).argmax(1)] == y
        flips = int((old_right & ~right).sum())
        points.append(GridPoint(a, float(right.mean()), flips / max(len(y), 1), flips))
        states[a] = state
    chosen = choose_alpha(points, max_accuracy_drop)
    rule = (f"lowest NFR on {split} with accuracy >= v2's ({points[-1].accuracy:.4f})"
            + (f" - {max_accuracy_drop:g}" if max_accuracy_drop else ""))
    result = Interpolation(chosen.alpha, chosen, points, rule, state_dict=states[chosen.alpha])
    if publish:
        result.published = registry.publish(
            name or new_m.name, states[chosen.alpha], spec=spec, classes=list(new_m.classes),
            method=f"interpolate({new_m.method})",
            hyperparameters={"interpolation_alpha": chosen.alpha, "max_accuracy_drop": max_accuracy_drop,
                             "grid": list(grid), "split": split},
            dataset_checksum=info.checksum,
            metrics={"val_accuracy": chosen.accuracy, "val_nfr": chosen.nfr,
                     "val_negative_flips": chosen.negative_flips, "val_rows": int(len(y))},
            parent=old_m.ref,
            extra={"interpolated_from": {"old": old_m.ref, "new": new_m.ref, "alpha": chosen.alpha},
                   "interpolation_grid": [vars(g) for g in points]})
    return result


def format_grid(result: Interpolation) -> str:
    lines = ["| a | accuracy | NFR | negative flips |", "|---|---|---|---|"]
    for g in result.grid:
        mark = " (chosen)" if g.alpha == result.alpha else ""
        lines.append(f"| {g.alpha:g}{mark} | {g.accuracy:.4f} | {g.nfr:.4f} | {g.negative_flips} |")
    return "\n".join(lines)


def _grid_arg(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid takes comma-separated numbers in [0, 1], got {text!r}") from None


def run_interpolate(args: argparse.Namespace) -> int:
    registry = registry_root(args.registry)
    result = interpolate(args.data, args.old, args.new, registry_root=registry, split=args.split,
                         grid=args.grid, max_accuracy_drop=args.max_accuracy_drop, name=args.name,
                         publish=not args.no_publish)
    print(f"(1 - a) {args.old} + a {args.new} on {args.split}:")
    print(format_grid(result))
    print(f"chosen a = {result.alpha:g}: {result.rule}")
    if not result.helps:
        print("interpolation does not lower NFR at v2's accuracy here: a = 1 is v2 itself")
    if result.published is not None:
        print(f"published {result.published.name}@v{result.published.version} (parent {args.old})")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "interpolate", help="publish (1-a) v1 + a v2 with a chosen on validation (no retraining)",
        description="Weight interpolation between an old and a new model of the same architecture "
                    "(BCWI): evaluate a grid of a on the validation split, keep the lowest NFR at "
                    "v2's accuracy, and publish that model with its lineage.")
    p.add_argument("--old", required=True, help="v1 as NAME@VERSION")
    p.add_argument("--new", required=True, help="v2 as NAME@VERSION (same --model as v1; best warm-started)")
    p.add_argument("--data", required=True, help="dataset directory or URI")
    p.add_argument("--split", default="val", help="split a is chosen on (never test)")
    p.add_argument("--grid", type=_grid_arg, default=DEFAULT_GRID, help="values of a, e.g. 0.5,0.7,0.9 (1 is always added)")
    p.add_argument("--max-accuracy-drop", type=float, default=0.0,
                   help="accept points up to this much less accurate than v2 (default 0)")
    p.add_argument("--name", help="registry name to publish under (default: v2's)")
    p.add_argument("--registry", help="registry root (default $GRACEFUL_RAY_ROOT/registry)")
    p.add_argument("--no-publish", action="store_true", help="report the grid and the choice, publish nothing")
    p.set_defaults(func=run_interpolate)

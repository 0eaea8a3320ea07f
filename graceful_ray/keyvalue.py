"""``KEY=VALUE`` options (``--hp``, ``--model-arg``, ``--space``, ``--gate``), parsed one way.

Values are JSON when they parse as JSON (``1``, ``0.5``, ``true``, ``[1, 2]``) and
strings otherwise; an option whose values must be numbers says so.
"""

from __future__ import annotations

import json
from typing import Any

from graceful_ray.errors import ConfigError


def parse_kv(items: list[str] | None, *, option: str | None = None, shape: str = "KEY=VALUE",
             example: str | None = None, json_only: bool = False) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``.

    ``option`` names the flag in errors (``--gate 'x': ...``); with ``json_only``
    a value that is not JSON (a gate's number) is an error instead of a string.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        where = f"{option} {item!r}: " if option else ""
        if not sep or not key.strip():
            raise ConfigError(f"{where}expected {shape}" + (f", e.g. {example}" if example else "")
                              if option else f"expected {shape}, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            if json_only:
                raise ConfigError(f"{where}{value!r} is not a number") from None
            out[key.strip()] = value
    return out


def parse_gates(items: list[str] | None) -> dict[str, Any]:
    """``--gate`` values: ``["max_nfr=0.02", ...]`` -> ``{"max_nfr": 0.02}``."""
    return parse_kv(items, option="--gate", shape="NAME=VALUE", example="max_nfr=0.02", json_only=True)

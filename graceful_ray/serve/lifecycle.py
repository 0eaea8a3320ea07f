"""A deployment's graceful shutdown, which Serve awaits and Python's collector cannot.

Serve's graceful shutdown of a replica calls the deployment's ``__del__`` on the
replica's event loop and awaits the coroutine it returns (the router's last
events, the comparator's final flush). Python calls ``__del__`` as well, when
the object is collected: in a replica after Serve's call, or for an instance
built in-process (tests, benchmarks). An ``async def __del__`` then makes a
coroutine that nothing awaits, dropped with "coroutine ... was never awaited".
So ``__del__`` is a plain method that returns :func:`on_serve_shutdown`'s value.

Not for an ``@serve.ingress`` class (the router): Serve's ingress wrapper has an
``async def __del__`` of its own, awaits the class's ``__del__`` only when that is
``async def`` too, and drops what a plain one returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


def on_serve_shutdown(owner: Any, shutdown: Callable[[], Coroutine[Any, Any, None]]
                      ) -> Coroutine[Any, Any, None] | None:
    """What ``owner.__del__`` returns: ``shutdown()`` the first time it is called on a
    running event loop (Serve's call, which awaits it), else None (the collector's
    call after it, or with no loop to run a coroutine)."""
    if getattr(owner, "_shutdown_started", False):
        return None
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return None
    owner._shutdown_started = True
    return shutdown()

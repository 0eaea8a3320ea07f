"""The project's log records in Serve's replica logs, at their own level.

Serve configures only its ``ray.serve`` logger in a replica (its handlers write
``logs/serve/replica_*.log`` and add the replica's context) and redirects the
replica's ``sys.stderr`` into that logger *at INFO*. Our ``graceful_ray.*``
loggers have no handler, so a ``log.warning`` reached Python's last-resort
handler, which writes to ``sys.stderr``: the warning came out of Serve's
redirect as an INFO line. :func:`to_serve_logs`, called in each deployment's
constructor, hands our records to ``ray.serve``'s handlers unchanged (level,
logger name), so a warning is a WARNING in the replica log and in what Serve
streams to the driver.
"""

from __future__ import annotations

import logging

# Lazy imports: Ray Serve loads only when asked whether this process is a replica, so the log
# handler imports without Ray.

SERVE_LOGGER = "ray.serve"  # ray.serve._private.constants.SERVE_LOGGER_NAME
PROJECT_LOGGER = "graceful_ray"


class ServeLogHandler(logging.Handler):
    """Passes each record to Serve's logger, whose handlers and filters do the rest."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(SERVE_LOGGER).handle(record)


def in_replica() -> bool:
    """Whether this process is a Serve replica (not, e.g., a test building the class)."""
    from ray import serve

    try:
        serve.get_replica_context()
    except Exception:  # noqa: BLE001 - RayServeException outside a replica
        return False
    return True


def to_serve_logs(level: int = logging.INFO, *, only_in_replica: bool = True) -> None:
    """Send ``graceful_ray`` records at ``level`` and above to Serve's replica log (idempotent).

    Outside a replica (``only_in_replica``: a unit test constructing a deployment's
    class in its own process) logging is left as the process has it."""
    if only_in_replica and not in_replica():
        return
    logger = logging.getLogger(PROJECT_LOGGER)
    logger.setLevel(level)
    if not any(isinstance(h, ServeLogHandler) for h in logger.handlers):
        logger.addHandler(ServeLogHandler())
    # Serve's handlers have the records now; the root logger's (or the last-resort
    # handler's stderr, which Serve logs again at INFO) would repeat them.
    logger.propagate = False

"""The routing state a router replica acts on: who is primary, how much is shadowed.

The comparator owns the state; every router replica keeps a copy that it learns
from the comparator's answers (to event batches, to admin calls). Those answers
can reach a replica out of order: an event batch sent just before a cutover may
be answered with the pre-cutover state *after* the cutover's own answer arrived.
Applying it would route to the old primary again until the next sync. So every
change of the state bumps ``revision``, and a copy never goes back to an older
revision of the same comparator ``incarnation``. A restarted comparator is a new
incarnation: its state is taken whatever its revision (it restores the saved
state, but a lost state file would restart the count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from graceful_ray.serve.shadow_config import BASELINE


@dataclass
class RoutingCopy:
    """A router replica's copy of the comparator's routing state."""

    primary: str = BASELINE
    shadow_fraction: float = 0.0
    epoch: int = 0        # bumped by cutover and rollback; stamped on every record
    revision: int = -1    # bumped by every change; -1: nothing learnt yet
    incarnation: str = ""  # which start of the comparator the revision counts in

    def apply(self, routing: Mapping[str, Any]) -> bool:
        """Take ``routing`` unless it is older than what this copy holds.

        Returns whether the primary or epoch changed. Answers without routing
        (errors from the comparator) are ignored. An answer without a revision
        (a comparator of an earlier release, during a rolling update) is taken
        as it comes, as that release's routers did.
        """
        if "primary" not in routing:
            return False
        revision, incarnation = int(routing.get("revision", -1)), str(routing.get("incarnation", ""))
        if incarnation == self.incarnation and revision < self.revision:
            return False
        changed = (routing["primary"], int(routing["epoch"])) != (self.primary, self.epoch)
        self.primary = routing["primary"]
        self.shadow_fraction = float(routing["shadow_fraction"])
        self.epoch = int(routing["epoch"])
        self.revision, self.incarnation = revision, incarnation
        return changed

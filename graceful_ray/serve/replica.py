"""The per-model-version deployment: where the shadow copy of a request runs.

Each compared version gets its own deployment, so a shadow that is slow,
raises, or dies has its own processes and queue: nothing it does can reach the
router's event loop or the primary's compute thread. When the primary is not
run inside the router (``primary_in_ingress=False``), the primary is served from
here too.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
from ray import serve

from graceful_ray.serve.config import Batching
from graceful_ray.serve.logs import to_serve_logs
from graceful_ray.serve.runner import (ModelRunner, Prediction, cut, lower_priority, pick_device,
                                       split_rows)
from graceful_ray.serve.search import SearchAnswer, SearchBackend

log = logging.getLogger(__name__)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class ModelReplica:
    """One registry version behind ``@serve.batch``."""

    def __init__(self, registry_root: str, ref: str, batching: Batching, num_gpus: float = 0.0,
                 torch_threads: int = 1, nice: int = 0, gallery: str | None = None,
                 gallery_poll_s: float = 2.0, sched_idle: bool = False) -> None:
        to_serve_logs()
        lower_priority(nice, idle=sched_idle)
        self._runner = ModelRunner(registry_root, ref, device=pick_device(num_gpus),
                                   torch_threads=torch_threads)
        # With a gallery, this version also answers (shadow) searches; a version the
        # registry keeps out of the gallery's space answers "refused" (see serve.search).
        self._search = (SearchBackend(gallery, registry_root, self._runner.ref, gallery_poll_s)
                        if gallery else None)
        self.reconfigure(dataclasses.asdict(batching))

    def reconfigure(self, user_config: dict) -> None:
        """Serve's ``user_config``: this version's batching, changed in place (no restart)."""
        batching = Batching.from_user_config(user_config, "model user_config")
        self._batch.set_max_batch_size(batching.max_batch_size)
        self._batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _batch(self, items: list[tuple[np.ndarray, bool]]) -> list[Prediction]:
        blocks, sizes = split_rows([x for x, _ in items])
        pred = await self._runner.predict_async(blocks, any(s for _, s in items))
        return cut(pred, sizes)

    async def predict(self, x: np.ndarray, with_scores: bool = False
                      ) -> tuple[np.ndarray, np.ndarray | None, float]:
        """``(decisions, scores or None, model milliseconds)`` for rows ``x``.

        The milliseconds run from this call to its result (batch wait plus
        compute), measured the same way the router measures its primary.
        """
        t0 = time.perf_counter()
        pred = await self._batch((x, with_scores))
        return pred.decisions, pred.scores, (time.perf_counter() - t0) * 1000.0

    async def search(self, x: np.ndarray, k: int) -> SearchAnswer:
        """Top-``k`` gallery ids and scores for rows ``x``, embedded by this version.

        ``SearchAnswer.refused`` says why when this version may not search the
        gallery (or none is configured); query errors raise.
        """
        t0 = time.perf_counter()
        if self._search is None:
            return SearchAnswer(refused="this deployment has no gallery")
        answer = await self._runner.run_async(self._search.search, self._runner.embed, x, k)
        return answer.with_ms((time.perf_counter() - t0) * 1000.0)

    def describe(self) -> dict:
        return {"ref": self._runner.ref, "classes": self._runner.classes.tolist(),
                "input_shape": list(self._runner.input_shape)}

    def __del__(self) -> None:
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.close()
        search = getattr(self, "_search", None)
        if search is not None:
            search.close()

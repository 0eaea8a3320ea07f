"""``POST /v1/search`` behind the shadow router: one model's view of the gallery.

Each compared model searches the gallery with its *own* query embeddings, so
each gets a :class:`SearchBackend`: a :class:`~graceful_ray.retrieval.GallerySearcher`
opened for that model (which runs the registry's embedding-space check and
follows newly published snapshots), or -- when the registry says the model may
not search the gallery -- the reason why. Embedding uses the model the replica
already loaded for ``/v1/predict`` (:meth:`ModelRunner.embed`), not a second copy.

Policy for a model that may not search the gallery (see also ``check_gallery``):

* the baseline (the primary when a deployment starts) is refused at deploy
  time: ``build_app`` raises, nothing is deployed;
* the candidate is *not* refused at deploy time, because predict shadowing
  must still work for a classifier that was retrained in a new space. Its
  shadow searches are **skipped** and counted with their reason under
  ``retrieval.models.<role>.skipped`` in the report -- not as shadow errors,
  which feed the predict cutover gate (``max_error_rate``). If it is made
  primary anyway (cutover), ``/v1/search`` answers 409 with the reason until a
  rollback, or until the gallery is backfilled into its space (a refused
  backend tries again every ``gallery_poll_s``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from graceful_ray.errors import GracefulRayError
from graceful_ray.retrieval.embedding_space import check_snapshot
from graceful_ray.retrieval.errors import EmbeddingSpaceError
from graceful_ray.retrieval.gallery import Gallery
from graceful_ray.retrieval.searcher import GallerySearcher
from graceful_ray.serve.shadow_config import BASELINE, ROLES

# Lazy imports: the registry (torch) loads only to check a gallery against its model, at start-up.

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchAnswer:
    """One model's top-k for a block of query rows, or why it did not search."""

    ids: np.ndarray | None = None        # (n, k) gallery ids (int64 or object/str)
    scores: np.ndarray | None = None     # (n, k) float32 cosine, descending
    labels: np.ndarray | None = None     # (n, k) int64 gallery labels (-1: none); None: no labels
    snapshot: int | None = None          # the gallery snapshot every hit came from
    k: int = 0                           # results per row (k clamped to the gallery size)
    ms: float = 0.0                      # model milliseconds (embed + search, plus any wait)
    refused: str | None = None           # set when the model may not search the gallery

    def with_ms(self, ms: float) -> "SearchAnswer":
        return replace(self, ms=ms)


class SearchRefused(GracefulRayError):
    """The primary may not search the gallery (answered as HTTP 409)."""


class SearchBackend:
    """A model's :class:`GallerySearcher`, or the reason it may not have one.

    Thread-safe: :meth:`search` runs on the model's compute thread while the
    searcher's own thread reloads snapshots.
    """

    def __init__(self, gallery: str, registry: str, ref: str, poll_s: float = 2.0) -> None:
        self.gallery = gallery
        self.registry = registry
        self.ref = ref
        self.poll_s = float(poll_s)
        self.reason: str | None = None
        self._searcher = None
        self._tried = 0.0
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        self._tried = time.monotonic()
        try:
            self._searcher = GallerySearcher(self.gallery, registry=self.registry,
                                             query_model=self.ref, reload="background",
                                             poll_s=self.poll_s)
        except Exception as e:  # noqa: BLE001 - a refused or unreadable gallery is a reason
            reason = str(e) if isinstance(e, GracefulRayError) else f"{type(e).__name__}: {e}"
            if reason != self.reason:
                log.warning("%s cannot search gallery %s: %s", self.ref, self.gallery, reason)
            self.reason = reason
            return
        if self.reason is not None:
            log.info("%s may search gallery %s now", self.ref, self.gallery)
        self.reason = None

    def searcher(self):
        """The searcher, or None (then :attr:`reason` says why); retries every ``poll_s``."""
        if self._searcher is None and time.monotonic() - self._tried >= self.poll_s:
            with self._lock:
                if self._searcher is None and time.monotonic() - self._tried >= self.poll_s:
                    self._open()
        return self._searcher

    def status(self) -> dict[str, Any]:
        s = self._searcher
        if s is None:
            return {"model": self.ref, "searchable": False, "reason": self.reason}
        snap = s.snapshot
        return {"model": self.ref, "searchable": True, "status": s.status, "snapshot": snap.seq,
                "rows": snap.rows, "embedding_space": snap.embedding_space}

    def search(self, embed: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
               k: int) -> SearchAnswer:
        """Embed rows ``x`` with ``embed`` and search the gallery (synchronous).

        A model that may not search answers ``SearchAnswer(refused=reason)``;
        bad query embeddings (NaN, all zeros) raise ``QueryError``.
        """
        t0 = time.perf_counter()
        searcher = self.searcher()
        if searcher is None:
            return SearchAnswer(refused=self.reason or "the gallery is not available")
        res = searcher.search(embed(x), int(k))
        return SearchAnswer(ids=res.ids, scores=res.scores, labels=res.labels, snapshot=res.snapshot,
                            k=int(res.k), ms=(time.perf_counter() - t0) * 1000.0)

    def close(self) -> None:
        if self._searcher is not None:
            self._searcher.close()


def check_gallery(config, refs: dict[str, str]) -> dict[str, str | None]:
    """At deploy time: per role, ``None`` if it may search ``config.gallery``, else why not.

    Raises (nothing is deployed) when the gallery does not exist or the
    baseline -- the primary when the deployment starts -- may not search it.
    """
    from graceful_ray.registry import Registry

    gallery = Gallery(config.gallery)
    snap = gallery.require_head()
    registry = Registry(config.registry)
    out: dict[str, str | None] = {}
    for role in ROLES:
        try:
            check = check_snapshot(registry, refs[role], snap, gallery_uri=gallery.uri)
        except EmbeddingSpaceError as e:
            if role == BASELINE:
                raise EmbeddingSpaceError(
                    f"the primary {refs[role]} may not search --gallery {gallery.uri}, so "
                    f"POST /v1/search could not be served; deploy with a gallery in its space or "
                    f"without --gallery. {e}", query=e.query, gallery_models=e.gallery_models,
                    remedies=e.remedies) from None
            log.warning("the candidate %s may not search gallery %s: its shadow searches will be "
                        "skipped (counted in the report's retrieval section). %s",
                        refs[role], gallery.uri, e)
            out[role] = str(e)
            continue
        log.info("%s", check.describe())
        out[role] = None
    return out


def overlap(a: Any, b: Any) -> float | None:
    """``|top-k(a) & top-k(b)| / k`` for one query's two id lists (``k``: the shorter).

    The same arithmetic as :func:`graceful_ray.retrieval.topk_overlap`, for one row.
    """
    if a is None or b is None:
        return None
    k = min(len(a), len(b))
    if k == 0:
        return None
    return len(set(list(a)[:k]) & set(list(b)[:k])) / k

"""May this model search that gallery? The registry decides, not the vector shapes.

Two models' embeddings are comparable only when the registry says they live in
the same embedding space: a model trained compatibly (BCT) joins its parent's
space, anything else opens a new one (DESIGN "Registry"). Equal dimensions
prove nothing: a plain retrain has the same dimension and meaningless cross
scores. So a query model may search a gallery when its manifest's
``embedding_space`` is the gallery's space (every row's vector is in that space,
checked when the snapshot was published). The check reports *why* it holds
(same model, compatible descendant and the chain that keeps the space,
ancestor, or sibling in the space), and when it does not, the error names both
models, both spaces, the query's lineage, and the ways out: backfill the
gallery with the new model, transform the stored embeddings, or train the new
model compatibly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graceful_ray.retrieval.errors import EmbeddingSpaceError

# Lazy imports: the registry (torch) loads only for the checks that read a model's manifest.


@dataclass(frozen=True)
class SpaceCheck:
    """A positive answer: the query model lives in the gallery's space, and how."""

    query: str
    space: str
    gallery_models: list[str]
    relation: str  # "same model" | "compatible descendant" | "ancestor" | "same space"
    chain: list[str] = field(default_factory=list)  # query -> ... -> gallery model, with methods

    def describe(self) -> str:
        via = f" via {' -> '.join(self.chain)}" if self.chain else ""
        return f"{self.query} may search space {self.space!r} ({self.relation}{via})"


def _lineage_text(lineage: list[Any]) -> str:
    """``v3 (bct, space s) <- v2 (plain, space t) <- v1``."""
    parts = []
    for m in lineage:
        parts.append(f"{m.ref} ({m.method}, space {m.embedding_space})")
    return " <- ".join(parts)


def check_query_model(registry: Any, query_ref: str, *, space: str, gallery_models: list[str],
                      gallery: str = "the gallery", dim: int | None = None,
                      gallery_uri: str | None = None) -> SpaceCheck:
    """Allow ``query_ref`` to search a gallery in ``space`` embedded by ``gallery_models``.

    Raises :class:`EmbeddingSpaceError` (naming both models and the remedies)
    when the registry puts the query model in another space.
    """
    from graceful_ray.registry import Registry

    reg = registry if isinstance(registry, Registry) else Registry(registry)
    q = reg.get(query_ref)
    models = sorted(gallery_models)
    gallery_desc = f"{gallery} (embedded by {', '.join(models) or 'no model'}; space {space!r})"
    lineage = reg.lineage(q.ref)
    if q.embedding_space != space or (dim is not None and q.embedding_dim != dim):
        main = models[0] if models else space
        G = gallery_uri or "GALLERY"
        remedies = [
            f"re-embed the gallery with {q.ref}: `graceful-ray gallery backfill --gallery {G} --model "
            f"{q.ref}` (searches keep being answered by the gallery's current model until the "
            "backfill completes)",
            f"upgrade the stored embeddings with a learned transformation: `graceful-ray gallery "
            f"transform --gallery {G} --old {main} --new {q.ref} --data DATA` (no raw inputs needed "
            "for the gallery itself)",
            f"or train the new model compatibly with the gallery's model (`graceful-ray train "
            f"--method bct --old {main}`) so that it joins space {space!r}",
        ]
        why = (f"its embedding dimension {q.embedding_dim} differs from the gallery's {dim}"
               if dim is not None and q.embedding_dim != dim and q.embedding_space == space
               else f"it lives in embedding space {q.embedding_space!r}")
        raise EmbeddingSpaceError(
            f"model {q.ref} may not search {gallery_desc}: {why}, so its query embeddings are not "
            f"comparable with the gallery's (lineage: {_lineage_text(lineage)}). Ways out: "
            + "; ".join(remedies),
            query=q.ref, gallery_models=models, remedies=remedies)
    if models == [q.ref]:
        return SpaceCheck(q.ref, space, models, "same model")
    refs = [m.ref for m in lineage]
    for gm in models:
        if gm in refs and gm != q.ref:
            upto = lineage[: refs.index(gm) + 1]
            chain = [f"{m.ref} ({m.method})" for m in upto]
            return SpaceCheck(q.ref, space, models, "compatible descendant", chain)
    for gm in models:
        try:
            g_lineage = [m.ref for m in reg.lineage(gm)]
        except Exception:  # noqa: BLE001 - a gallery model deleted from the registry
            continue
        if q.ref in g_lineage:
            return SpaceCheck(q.ref, space, models, "ancestor")
    return SpaceCheck(q.ref, space, models, "same space")


def check_snapshot(registry: Any, query_ref: str, snap: Any, gallery_uri: str = "the gallery") -> SpaceCheck:
    """:func:`check_query_model` against a gallery snapshot."""
    return check_query_model(registry, query_ref, space=snap.embedding_space,
                             gallery_models=sorted(snap.models), gallery=f"gallery {gallery_uri}",
                             dim=snap.dim, gallery_uri=gallery_uri)

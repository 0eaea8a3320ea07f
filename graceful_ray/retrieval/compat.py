"""Several generations at once: the matrix ``M(v_i, v_j)``, AC / AM, and what the registry allows.

DESIGN "Metrics": across generations v1..vT, query model ``v_i`` against a
gallery of ``v_j`` on one evaluation set; AC is the share of pairs ``i > j``
meeting ``M(v_i, v_j) > M(v_j, v_j)`` and AM the mean of the lower triangle.
Next to each pair this reports whether the registry lets ``v_i`` search a
``v_j`` gallery at all (same embedding space along the lineage), so a matrix
entry that looks fine but is not deployable is visible as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from graceful_ray.data import load_split
from graceful_ray.metrics import compatibility_matrix, m_score
from graceful_ray.retrieval.embedding_space import check_query_model
from graceful_ray.retrieval.errors import EmbeddingSpaceError

# Lazy imports: evaluation and the registry (torch) load only when a report is computed.


@dataclass
class GenerationsReport:
    refs: list[str]
    metric: str
    matrix: np.ndarray
    ac: float
    am: float
    allowed: list[list[bool]]  # allowed[i][j]: registry lets v_i search a v_j gallery
    spaces: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"refs": self.refs, "metric": self.metric, "ac": self.ac, "am": self.am,
                "matrix": [[float(v) for v in row] for row in self.matrix], "allowed": self.allowed,
                "spaces": self.spaces}

    def table(self) -> str:
        w = max(12, *(len(r) for r in self.refs)) + 2
        lines = [f"M(query v_i, gallery v_j), {self.metric}; * = the registry refuses this search "
                 "(different embedding space)",
                 "query \\ gallery".ljust(w) + "".join(r.rjust(w) for r in self.refs)]
        for i, r in enumerate(self.refs):
            cells = []
            for j in range(len(self.refs)):
                v = self.matrix[i, j]
                cells.append(("" if np.isnan(v) else f"{v:.4f}" + ("" if self.allowed[i][j] else "*")).rjust(w))
            lines.append(r.ljust(w) + "".join(cells))
        lines.append(f"AC (share of i > j with M(v_i, v_j) > M(v_j, v_j)) = {self.ac:.3f}; "
                     f"AM (mean over i >= j) = {self.am:.4f}")
        return "\n".join(lines)


def generations_report(data: str, split: str, refs: Sequence[str], *, registry: str,
                       metric: str = "top1") -> GenerationsReport:
    """Embed ``split`` with every generation and fill the full matrix."""
    from graceful_ray.evaluate import predict
    from graceful_ray.registry import Registry

    reg = Registry(registry)
    manifests = [reg.get(r) for r in refs]
    x, y, _ = load_split(data, split)
    embs = [predict(registry, m.ref, x).embeddings for m in manifests]
    dims = {e.shape[1] for e in embs}
    allowed = []
    for qi in manifests:
        row = []
        for gj in manifests:
            try:
                check_query_model(reg, qi.ref, space=gj.embedding_space, gallery_models=[gj.ref],
                                  dim=gj.embedding_dim)
                row.append(True)
            except EmbeddingSpaceError:
                row.append(False)
        allowed.append(row)
    if len(dims) == 1:
        cm = compatibility_matrix(embs, y, metric=metric, full=True)
        matrix, ac, am = cm.matrix, cm.ac, cm.am
    else:  # different dimensions: only same-model cells are defined
        t = len(embs)
        matrix = np.full((t, t), np.nan)
        for i in range(t):
            for j in range(t):
                if embs[i].shape[1] == embs[j].shape[1]:
                    matrix[i, j] = m_score(embs[i], embs[j], y).metric(metric)
        ac, am = float("nan"), float("nan")
    return GenerationsReport([m.ref for m in manifests], metric, matrix, ac, am, allowed,
                             [m.embedding_space for m in manifests])

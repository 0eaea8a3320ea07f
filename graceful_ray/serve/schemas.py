"""The HTTP edge: request bodies as pydantic models, and input checking.

Structure (which fields, which JSON types) is pydantic's job; the numbers
themselves are checked with numpy in one pass, because a pydantic model per
float costs more than the model inference for small networks. Every rejection
names the input and what was expected, so a caller can fix it without reading
the server's logs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class InputError(Exception):
    """A request the service refuses; carries the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


#: A segment names a slice of traffic (a market, a device, a customer tier): short,
#: and only characters that are safe in a Prometheus label, a file and a log line.
SEGMENT_PATTERN = r"^[A-Za-z0-9_.:/-]{1,64}$"


class InputsRequest(BaseModel):
    """``{"input": [...]}`` for one sample or ``{"inputs": [[...], ...]}`` for several."""

    model_config = ConfigDict(extra="forbid")

    input: list[Any] | None = Field(
        default=None, description="one sample: its features (flat, or nested to the input shape)")
    inputs: list[Any] | None = Field(default=None, description="several samples")


class PredictRequest(InputsRequest):
    """Inputs, and optionally the ``segment`` they belong to (reported and gated per slice)."""

    segment: StrictStr | None = Field(
        default=None, pattern=SEGMENT_PATTERN,
        description="the slice of traffic these inputs belong to: 1-64 letters, digits or "
                    "_ . : / -")


class SearchRequest(InputsRequest):
    """``{"inputs": [[...], ...], "k": 5}`` (or ``"input"`` for one sample): raw inputs,
    as for predict; the primary embeds them and searches the gallery."""

    k: StrictInt | None = Field(default=None, description="results per input (default: the "
                                                           "service's search_k)")


def check_k(k: int | None, default: int, max_k: int) -> int:
    """The ``k`` a search uses, or :class:`InputError` when it is out of range."""
    if k is None:
        return default
    if not 1 <= k <= max_k:
        raise InputError(422, f"k must be between 1 and {max_k} (this service's max_search_k), "
                              f"got {k}")
    return k


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: StrictStr = Field(min_length=1, max_length=128)
    label: StrictInt


class FeedbackRequest(BaseModel):
    """``{"request_id": ..., "label": 3}`` or ``{"labels": [{...}, ...]}``."""

    model_config = ConfigDict(extra="forbid")

    request_id: StrictStr | None = Field(default=None, min_length=1, max_length=128)
    label: StrictInt | None = None
    labels: list[FeedbackItem] | None = None


class CutoverRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: StrictBool = False
    reason: str = Field(default="", max_length=1000)


class FractionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shadow_fraction: float = Field(ge=0.0, le=1.0)


def parse_inputs(body: InputsRequest, input_shape: tuple[int, ...],
                 max_inputs: int) -> tuple[np.ndarray, bool]:
    """``(rows as float32 (n, *input_shape), single)`` or :class:`InputError`.

    A sample may be given flat (``numel`` numbers) or nested to the model's
    input shape; strings, booleans, ragged lists and non-finite numbers are
    refused rather than coerced.
    """
    if (body.input is None) == (body.inputs is None):
        raise InputError(422, "give exactly one of 'input' (one sample) or 'inputs' (a list of "
                              "samples)")
    single = body.input is not None
    samples = [body.input] if single else body.inputs
    if not samples:
        raise InputError(422, "'inputs' is empty: send at least one sample")
    if len(samples) > max_inputs:
        raise InputError(413, f"too many inputs in one request: {len(samples)} > "
                              f"{max_inputs}; split the request")
    numel = math.prod(input_shape)
    shape_txt = "x".join(map(str, input_shape))
    try:
        arr = np.asarray(samples)
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.dtype == object:
        # Ragged or mixed: find the first bad sample to name it.
        for i, s in enumerate(samples):
            _check_one(s, i, numel, shape_txt)
        raise InputError(422, f"the inputs are nested differently from each other; give every "
                              f"sample as {numel} numbers or every sample with shape {shape_txt}")
    if arr.dtype.kind not in "iuf":
        what = {"b": "booleans", "U": "strings", "S": "strings"}.get(arr.dtype.kind,
                                                                     str(arr.dtype))
        raise InputError(422, f"inputs must be numbers, got {what}")
    n = arr.shape[0]
    if arr.shape[1:] == tuple(input_shape):
        rows = arr.reshape(n, *input_shape)
    elif arr.ndim == 2 and arr.shape[1] == numel:
        rows = arr.reshape(n, *input_shape)
    else:
        got = "x".join(map(str, arr.shape[1:])) or "a scalar"
        raise InputError(422, f"each input must have shape {shape_txt} ({numel} numbers), got "
                              f"{got}")
    rows = rows.astype(np.float32, copy=False)
    if not np.isfinite(rows).all():
        bad = int(np.flatnonzero(~np.isfinite(rows).reshape(n, -1).all(axis=1))[0])
        raise InputError(422, f"input {bad} contains NaN or infinity")
    return np.ascontiguousarray(rows), single


def _check_one(sample: Any, i: int, numel: int, shape_txt: str) -> None:
    """Raise :class:`InputError` naming sample ``i`` if it is bad on its own."""
    try:
        a = np.asarray(sample)
    except (ValueError, TypeError):
        raise InputError(422, f"input {i} is ragged: nested lists of unequal length") from None
    if a.dtype == object:
        raise InputError(422, f"input {i} is ragged or mixes numbers with other values")
    if a.dtype.kind not in "iuf":
        raise InputError(422, f"input {i} must hold numbers, got {a.dtype.kind!r} values "
                              f"(e.g. {a.reshape(-1)[:1].tolist()})")
    if a.size != numel:
        raise InputError(422, f"input {i} has {a.size} numbers; the model expects {numel} "
                              f"(shape {shape_txt})")

"""What a Ray Serve user has without shadow mode: one deployment of the same model.

The comparison row of ``benchmarks/serve_shadow.py``: a FastAPI ingress that runs
the model itself behind ``@serve.batch``, with the shadow router's resources
(0.5 CPU, one torch thread), its batching (64 requests, 2 ms) and the same
compute path (:class:`graceful_ray.serve.runner.ModelRunner`), so the gap to the
shadow app is what shadow mode adds (recording, copies, routing state), not a
different model server. Importable by Serve's replicas through ``PYTHONPATH``
(``serve_shadow.py`` puts this folder there).
"""

# No `from __future__ import annotations`: FastAPI must see the body model class.
import numpy as np
import orjson
from fastapi import FastAPI, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel
from ray import serve

from graceful_ray.serve.runner import ModelRunner, cut, split_rows

api = FastAPI()


class PlainRequest(BaseModel):
    input: list[float] | None = None
    inputs: list[list[float]] | None = None


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
@serve.ingress(api)
class PlainServe:
    def __init__(self, registry: str, ref: str) -> None:
        self._runner = ModelRunner(registry, ref, device="cpu", torch_threads=1)
        self._shape = tuple(self._runner.input_shape)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _batch(self, xs: list[np.ndarray]):
        x, sizes = split_rows(xs)
        return cut(await self._runner.predict_async(x), sizes)

    @api.post("/v1/predict")
    async def predict(self, body: PlainRequest):
        rows = [body.input] if body.input is not None else body.inputs
        if not rows:
            raise HTTPException(422, "give 'input' or 'inputs'")
        x = np.asarray(rows, np.float32).reshape((len(rows),) + self._shape)
        pred = await self._batch(x)
        decisions = pred.decisions.tolist()
        out = {"predictions": [{"decision": decisions[i], "scores": pred.scores[i]}
                               for i in range(len(rows))]}
        # orjson, as the shadow router answers: numpy scores without a Python copy
        return Response(orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")


def plain_serve_app(registry: str, ref: str):
    return PlainServe.bind(registry, ref)

"""How every route of the shadow service answers a bad request: a 4xx whose body
says what is wrong and never carries the input back.

Two things here, both installed on the FastAPI app once (:func:`install`):

* a body size limit: a request whose body exceeds ``max_request_bytes`` (a
  :class:`~graceful_ray.serve.config.ShadowConfig` field) is answered 413
  before a route parses it, whether it says its length up front or streams it;
* validation errors as ``{"detail": [{"loc", "msg", "type"}]}``: pydantic's
  errors also hold the offending ``input`` (the raw bytes of malformed JSON, a
  NaN, a 10 MB list), which JSON cannot always encode (a 500) and which must not
  be echoed anyway.

Routes that parse their own body (the admin ones) use :func:`parse_body`, so
their errors take the same shape.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from graceful_ray.serve.config import ShadowConfig


def safe_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI errors without their ``input``, ``ctx`` and ``url``."""
    return [{"loc": [p if isinstance(p, (str, int)) else str(p) for p in e.get("loc", ())],
             "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors]


def one_line(errors: list[dict[str, Any]]) -> str:
    """The :func:`safe_errors` as one line a person reads: ``field: what is wrong; ...``."""
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e["loc"] if p != "body")
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "invalid request body: " + "; ".join(parts)


def _invalid(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """A 422 body: ``detail`` (FastAPI's list, without the input) and one ``message``."""
    safe = safe_errors(errors)
    return {"detail": safe, "message": one_line(safe)}


def parse_body(raw: bytes, model: type[BaseModel], required: bool = False) -> BaseModel:
    """``raw`` as ``model`` (strict JSON, no NaN/Infinity where the model says so),
    or a 422 that names the fields, not the input (see :func:`install`)."""
    if not raw.strip():
        if required:
            raise HTTPException(422, f"a JSON body is required: {model.__name__} fields "
                                     f"{sorted(model.model_fields)}")
        return model()
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        # answered by install()'s handler, as FastAPI's own body errors are
        raise RequestValidationError(e.errors()) from None


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (declared or streamed).

    ``max_bytes`` is a class attribute the router sets from its config when it
    starts: each Serve replica is its own process with one router in it.
    """

    max_bytes: int = ShadowConfig.max_request_bytes

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = BodyLimit.max_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await _too_large(send, limit)
                    return
        seen, refused = 0, False

        async def limited_receive():
            # A streamed body: answer 413 as soon as it passes the limit, then tell
            # the route the client left (what it does with that is not sent).
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    await _too_large(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"detail": f"request body over the service's limit of {limit} bytes "
                                 "(ShadowConfig.max_request_bytes); send fewer inputs per "
                                 "request"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def install(api: FastAPI) -> None:
    """The size limit and the input-free validation errors, on every route of ``api``."""

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError) -> Response:
        return Response(json.dumps(_invalid(exc.errors())), status_code=422,
                        media_type="application/json")

    api.add_middleware(BodyLimit)

"""Pieces every service's FastAPI app shares: probes, metrics, bearer-token auth, a bound
on request bodies."""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hapo.config import MIN_API_TOKEN_CHARS

ReadinessT = TypeVar("ReadinessT", bound="Readiness")


def bearer_auth(token: SecretStr | None) -> Callable[[Request], None]:
    """A FastAPI dependency that admits requests carrying ``Authorization: Bearer <token>``.

    Compared in constant time. With no token configured every request is refused: admin
    routes are never open by accident.

    Raises:
        ValueError: a token shorter than ``MIN_API_TOKEN_CHARS`` (an empty one would admit
            ``Authorization: Bearer`` with nothing after it). The config refuses those too.
    """
    expected = token.get_secret_value().encode() if token is not None else None
    if expected is not None and len(expected) < MIN_API_TOKEN_CHARS:
        raise ValueError(f"api.token must be at least {MIN_API_TOKEN_CHARS} characters")

    def require_token(request: Request) -> None:
        if expected is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "admin API disabled: set HAPO_API_TOKEN"
            )
        scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(supplied.encode(), expected):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_token


DRAIN_BYTES = 64 << 20
"""Bytes of a refused body read and dropped before the 413 goes out (see ``BodySizeLimit``)."""


class BodySizeLimit:
    """ASGI middleware answering 413 to a request body over ``max_bytes`` (declared in
    ``Content-Length`` or streamed), before any route parses it or checks its token: an
    unauthenticated client cannot make a service buffer or decode more than that.

    The rest of a refused body is read and dropped (up to ``DRAIN_BYTES``) before the 413
    is sent: most clients write the whole body before reading the reply, and a server that
    answers and closes meanwhile gives them a reset connection instead of the reason."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._refuse(receive, send, size=0)
            return
        messages: list[Message] = []
        size, more = 0, True
        while more:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._refuse(receive, send, size, more=more)
                return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, receive: Receive, send: Send, size: int, more: bool = True) -> None:
        while more and size <= DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        await send({
            "type": "http.response.start", "status": status.HTTP_413_CONTENT_TOO_LARGE,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": body})


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    """What ``/readyz`` reports; services add their own checks as fields."""

    ready: bool


async def redis_answers(client: aioredis.Redis) -> bool:
    try:
        return bool(await client.ping())
    except (aioredis.RedisError, OSError):
        return False


def add_probe_routes(
    app: FastAPI,
    registry: CollectorRegistry,
    readiness: Callable[[], Awaitable[ReadinessT]],
    readiness_model: type[ReadinessT],
) -> None:
    """``GET /healthz`` (the process is up), ``/readyz`` (``readiness()``, 503 when not
    ready) and ``/metrics`` (Prometheus text of ``registry``)."""

    @app.get("/healthz")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=readiness_model, responses={503: {"model": readiness_model}})
    async def readyz(response: Response) -> ReadinessT:
        report = await readiness()
        if not report.ready:
            response.status_code = 503
        return report

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        """Prometheus text exposition format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

"""Bearer-token auth of the services' HTTP routes, and the bound on request bodies."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import SecretStr

from hapo.runtime.http import BodySizeLimit, bearer_auth


def _client(token: SecretStr | None) -> TestClient:
    app = FastAPI()

    @app.get("/admin", dependencies=[Depends(bearer_auth(token))])
    def admin() -> dict[str, bool]:
        return {"ok": True}

    return TestClient(app)


def test_only_the_token_opens_the_route() -> None:
    client = _client(SecretStr("a-token-of-20-chars!"))
    assert client.get("/admin", headers={"Authorization": "Bearer a-token-of-20-chars!"}).json()
    for header in ("", "Bearer", "Bearer ", "Bearer a-token-of-20-chars", "Basic x"):
        assert client.get("/admin", headers={"Authorization": header}).status_code == 401
    closed = _client(None)  # no token configured: closed to everyone
    assert closed.get("/admin", headers={"Authorization": "Bearer "}).status_code == 401


@pytest.mark.parametrize("token", ["", "fifteen-chars!!"])
def test_an_empty_or_short_token_is_refused(token: str) -> None:
    # compare_digest(b"", b"") is true: an empty token would open the route to
    # "Authorization: Bearer " with nothing after it.
    with pytest.raises(ValueError, match="at least 16 characters"):
        bearer_auth(SecretStr(token))


LIMIT = 4096


def _limited_client() -> tuple[TestClient, list[int]]:
    """An app behind ``BodySizeLimit(LIMIT)`` whose route records each body's length it
    was handed, and whose auth would refuse every request (it must never be reached by an
    oversized one)."""
    app = FastAPI()
    app.add_middleware(BodySizeLimit, max_bytes=LIMIT)
    seen: list[int] = []

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        body = await request.body()
        seen.append(len(body))
        return {"length": len(body)}

    @app.post("/admin", dependencies=[Depends(bearer_auth(None))])
    async def admin(request: Request) -> None:
        seen.append(-1)

    return TestClient(app), seen


def _chunks(total: int, size: int = 1000) -> Iterator[bytes]:
    """``total`` bytes in chunks of ``size``: a streamed body with no Content-Length."""
    while total > 0:
        yield b"x" * min(size, total)
        total -= size


def test_a_body_at_the_limit_reaches_the_route_whole() -> None:
    client, seen = _limited_client()
    assert client.post("/echo", content=b"y" * LIMIT).json() == {"length": LIMIT}
    assert client.post("/echo", content=_chunks(LIMIT)).json() == {"length": LIMIT}
    assert seen == [LIMIT, LIMIT]


@pytest.mark.parametrize("path", ["/echo", "/admin"])
def test_a_body_over_the_limit_gets_413_before_route_or_auth(path: str) -> None:
    client, seen = _limited_client()
    declared = client.post(path, content=b"y" * (LIMIT + 1))
    streamed = client.post(path, content=_chunks(10 * LIMIT))
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json() == {"detail": f"request body over {LIMIT} bytes"}
    assert seen == []
    lying = client.post(path, content=b"{}", headers={"content-length": "12x"})
    assert lying.status_code == 413 and seen == []

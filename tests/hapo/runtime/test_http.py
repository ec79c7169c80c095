"""Bearer-token auth of the services' HTTP routes."""

from __future__ import annotations

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from hapo.runtime.http import bearer_auth


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

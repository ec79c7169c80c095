"""Pieces every service's FastAPI app shares: bearer-token auth for admin routes."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi import HTTPException, Request, status
from pydantic import SecretStr


def bearer_auth(token: SecretStr | None) -> Callable[[Request], None]:
    """A FastAPI dependency that admits requests carrying ``Authorization: Bearer <token>``.

    Compared in constant time. With no token configured every request is refused: admin
    routes are never open by accident.
    """
    expected = token.get_secret_value().encode() if token is not None else None

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

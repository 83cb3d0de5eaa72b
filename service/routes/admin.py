"""The admin token check shared by the admin endpoints (reload, load, unload)."""

from __future__ import annotations

import secrets

from fastapi import Request

from ..errors import ServiceError


class UnauthorizedError(ServiceError):
    status_code = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ForbiddenError(ServiceError):
    status_code = 403
    code = "admin_disabled"


def require_admin(request: Request) -> None:
    token = request.app.state.archserve.settings.admin_token
    if token is None or not token.get_secret_value():
        raise ForbiddenError("admin endpoints are disabled; set ARCHSERVE_ADMIN_TOKEN to enable them")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise UnauthorizedError("this endpoint needs 'Authorization: Bearer <admin token>'")

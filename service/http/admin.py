"""The checks shared by the admin endpoints (reload, load, unload): the admin token, and one worker process."""

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


def is_admin(request: Request) -> bool:
    """Whether the request carries the admin token. No Authorization header: False; a header that fails
    ``require_admin`` is refused (401 or 403) rather than served the public answer in silence."""
    if "authorization" not in request.headers:
        return False
    require_admin(request)
    return True


class SeveralWorkersError(ServiceError):
    status_code = 409
    code = "several_workers"


RESTART_HINT = (
    "send SIGHUP to the main process: it restarts the workers one at a time, each loading the repository and "
    "the experiments file anew before it takes requests"
)


def require_single_worker(request: Request, action: str, instead: str = RESTART_HINT) -> None:
    """Without an engine process, an admin action changes the state of the worker process that receives it, and
    only that one: with several workers, the others would go on serving the old state. Refused, saying what
    reaches them all. With an engine process (the default for several workers) it is done once, for all."""
    settings = request.app.state.archserve.settings
    workers = settings.workers
    if workers > 1 and not settings.split:
        raise SeveralWorkersError(
            f"{action} would reach only the one of this server's {workers} worker processes that took this "
            f"request; {instead}. Or run one worker per container, or set ARCHSERVE_ENGINE_PROCESS=auto."
        )

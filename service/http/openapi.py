"""The OpenAPI description as the server behaves: readable operation ids, no 422, errors as JSON.

FastAPI documents a 422 on every operation with parameters, but the app's handler answers validation errors
400 with the usual error body; each route documents its real errors (``service.http.schemas.errors``). And
FastAPI files a route's error bodies under the route's own media type (text/plain for /metrics, text/html
for the report page), where the error handlers always answer JSON.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute

_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def operation_id(route: APIRoute) -> str:
    """For a route without ``operation_id=``: its function's name (FastAPI's default appends path and method)."""
    return route.name


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` drop FastAPI's 422 responses and the schemas only they use, and describe every
    error body as JSON."""
    generate = app.openapi

    def openapi() -> dict:
        schema = generate()  # built once and cached by FastAPI; what follows is idempotent
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                responses.pop("422", None)
                for status, response in responses.items():
                    content = response.get("content")
                    if status.isdigit() and int(status) >= 400 and content and "application/json" not in content:
                        response["content"] = {"application/json": next(iter(content.values()))}
        components = schema.get("components", {}).get("schemas", {})
        for name in _VALIDATION_SCHEMAS:
            components.pop(name, None)
        return schema

    app.openapi = openapi

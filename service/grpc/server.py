"""The gRPC server of one process, beside its HTTP server: started and stopped by the app's lifespan.

Each worker process (front-end) runs its own, as it runs its own HTTP server: they all bind
``settings.grpc_port`` with SO_REUSEPORT and the kernel spreads new connections among them.
"""

from __future__ import annotations

import logging
import socket

import grpc

log = logging.getLogger("archserve.grpc")


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address needs its brackets


async def start(app) -> grpc.aio.Server | None:
    """Serve ``inference.GRPCInferenceService`` for ``app`` on its settings' gRPC port; None when that is 0."""
    settings = app.state.archserve.settings
    if not settings.grpc_port:
        return None
    from .service import InferenceService  # compiles the .proto: only in a process that serves gRPC

    server = grpc.aio.server(options=[
        # The REST body limit; grpc refuses a larger message itself (RESOURCE_EXHAUSTED), before reading it.
        ("grpc.max_receive_message_length", settings.max_body_bytes),
        ("grpc.so_reuseport", 1),  # every worker process binds the port (grpc's default on Linux: explicit)
    ])
    server.add_generic_rpc_handlers((InferenceService(app).handler(),))
    where = address(settings.host, settings.grpc_port)
    try:
        bound = server.add_insecure_port(where)
    except RuntimeError as exc:  # newer grpc raises; older returned 0
        bound, reason = 0, str(exc)
    else:
        reason = "the address is not available"
    if not bound:
        raise RuntimeError(f"cannot serve gRPC on {where}: {reason}; set ARCHSERVE_GRPC_PORT (0: no gRPC)")
    await server.start()
    log.info("gRPC (inference.GRPCInferenceService) on %s", where)
    return server


async def stop(server: grpc.aio.Server | None, grace_s: float) -> None:
    """Refuse new calls and give those in flight ``grace_s`` to finish (the models still run), then cancel them."""
    if server is not None:
        await server.stop(grace_s)


def warn_if_taken(host: str, port: int) -> None:
    """Log a warning if another process listens on the gRPC port. SO_REUSEPORT lets this server's workers share
    it, but also lets this server silently share it with another one of the same user (two servers on one port,
    each answering a share of the calls) where an HTTP port would fail to bind. Checked once, by the supervisor,
    before any worker binds it."""
    if not port:
        return
    try:
        family, kind, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
            probe.bind(sockaddr)  # without SO_REUSEPORT: fails if any socket listens there
    except OSError as exc:
        log.warning("gRPC port %s is in use (%s): this server's gRPC will share it with whatever listens there "
                    "(SO_REUSEPORT); set ARCHSERVE_GRPC_PORT or --grpc-port (0: no gRPC)",
                    address(host, port), exc.strerror or exc)

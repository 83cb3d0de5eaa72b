"""The shape of ``service/``: no import cycles, modules one can read in a sitting, and a request path that
crosses few modules (traced on a real server, not read off the source)."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import httpx

from tests.images import jpeg
from tests.service.server import running_server

SERVICE = Path(__file__).resolve().parents[2] / "service"
MAX_LINES = 400
# The classify path: body, route, data plane, decode, batcher, engine, served model, and the request log that
# wraps every request (service.logs: its id and the access line).
MAX_MODULES_ON_PATH = 8


def _module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The service modules ``path`` imports, at any depth of the file (function-level imports too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SERVICE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_service_module_imports_one_that_imports_it_back():
    graph = _graph()
    # Packages re-export their children; a child importing its package's siblings is not a cycle through it.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    assert _cycles(graph) == []


def test_the_import_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_service_module_is_longer_than_one_sitting():
    long = {str(p.relative_to(SERVICE)): n for p in SERVICE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_a_classify_request_crosses_at_most_eight_service_modules(exported_repo):
    seen: set[str] = set()
    recording = threading.Event()

    def profile(frame, event, _arg):
        if event == "call" and recording.is_set():
            name = frame.f_globals.get("__name__", "")
            if name.startswith("service."):
                seen.add(name)

    image = jpeg(500, 375)
    threading.setprofile(profile)  # every thread the server starts from here on: loop, pool, batches
    try:
        with running_server(models_dir=exported_repo, models=["resnet18"]) as (url, _app):
            assert httpx.post(f"{url}/classify/resnet18", content=image, timeout=60).status_code == 200  # warm
            recording.set()
            response = httpx.post(f"{url}/classify/resnet18", content=image, timeout=60)
            recording.clear()
    finally:
        threading.setprofile(None)
    assert response.status_code == 200
    path = sorted(seen)
    print("modules on the classify path:", path)
    assert "service.serving" in path and "service.models.batching" in path  # the tracer saw the request
    assert len(path) <= MAX_MODULES_ON_PATH, path

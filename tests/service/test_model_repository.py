"""The repository on disk through every door: start, hot reload, the load endpoint and the v2 index read it under
one rule (no model or version folder linked from outside it unless ARCHSERVE_ALLOW_SYMLINKS), and the index shows
paths and load errors only to the admin."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.images import jpeg
from tests.service.server import running_server, until

TOKEN = "admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ALLOW_HINT = "ARCHSERVE_ALLOW_SYMLINKS=true"


def place_version(source: Path, target: Path, name: str, version: int) -> None:
    """A copy of the version folder ``source`` at ``target``, published as ``name`` v``version``. The model files
    are hard links (the session's exports are never written to); the manifest is a new file."""
    shutil.copytree(source, target, copy_function=os.link)
    manifest = json.loads((source / "model.json").read_text())
    manifest["name"], manifest["version"] = name, version
    (target / "model.json").unlink()
    (target / "model.json").write_text(json.dumps(manifest))


class Layout:
    """``root/models`` holding resnet18 v1; the folders ``link_*`` add are linked into it from ``root/elsewhere``
    (outside the repository) or from ``models/.shelf`` (inside it, hidden from the listing)."""

    def __init__(self, root: Path, source: Path):
        self.models, self.elsewhere, self.source = root / "models", root / "elsewhere", source
        place_version(source, self.models / "resnet18" / "1", "resnet18", 1)

    def link_outside_version(self) -> Path:
        """``models/resnet18/2 -> elsewhere/resnet18-2``."""
        place_version(self.source, self.elsewhere / "resnet18-2", "resnet18", 2)
        link = self.models / "resnet18" / "2"
        link.symlink_to(self.elsewhere / "resnet18-2", target_is_directory=True)
        return link

    def link_outside_model(self) -> Path:
        """``models/outside -> elsewhere/outside``, a model of its own (v1)."""
        place_version(self.source, self.elsewhere / "outside" / "1", "outside", 1)
        link = self.models / "outside"
        link.symlink_to(self.elsewhere / "outside", target_is_directory=True)
        return link

    def link_inside_model(self) -> Path:
        """``models/linked -> models/.shelf/linked``: a link that stays inside the repository."""
        place_version(self.source, self.models / ".shelf" / "linked" / "1", "linked", 1)
        link = self.models / "linked"
        link.symlink_to(Path(".shelf") / "linked", target_is_directory=True)
        return link

    def link_all(self) -> list[Path]:
        """Every link above; the two that lead outside first."""
        return [self.link_outside_version(), self.link_outside_model(), self.link_inside_model()]


@pytest.fixture()
def layout(exported_repo, tmp_path) -> Layout:
    return Layout(tmp_path, exported_repo / "resnet18" / "1")


def served(url: str) -> list[tuple[str, int]]:
    return [(m["name"], m["version"]) for m in httpx.get(f"{url}/models", timeout=60).json()["models"]]


def index(url: str, headers=None) -> list[dict]:
    response = httpx.post(f"{url}/v2/repository/index", headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def refusals(caplog, link: Path) -> list[str]:
    """The warnings logged for ``link``."""
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.getMessage().startswith(f"{link} leads outside")]


def assert_refused_once(caplog, links: list[Path]) -> None:
    for link in links:
        messages = refusals(caplog, link)
        assert len(messages) == 1, (link, messages)
        assert ALLOW_HINT in messages[0] and str(link.resolve()) in messages[0], messages


def test_start_and_index_leave_out_folders_linked_from_outside(layout, caplog):
    caplog.set_level(logging.WARNING)
    outside_version, outside_model, _ = layout.link_all()
    with running_server(models_dir=layout.models, version_policy="all", poll_interval_s=0, admin_token=TOKEN,
                        warmup=False) as (url, _):
        assert served(url) == [("linked", 1), ("resnet18", 1)]  # a link inside the repository is served
        assert httpx.post(f"{url}/classify/linked", content=jpeg(), timeout=60).status_code == 200
        listed = [(e["name"], e["version"], e["state"]) for e in index(url, AUTH)]
        assert listed == [("linked", "1", "READY"), ("resnet18", "1", "READY")]
        assert index(url) == [{"name": n, "version": v, "state": s} for n, v, s in listed]
    assert_refused_once(caplog, [outside_version, outside_model])


@pytest.mark.parametrize("models, fragment", [([], "no models in"), (["outside"], "model 'outside' is not in")],
                         ids=["only-refused-folders", "a-refused-model-named"])
def test_a_start_with_only_refused_folders_fails_saying_why(layout, models, fragment):
    if not models:
        shutil.rmtree(layout.models / "resnet18")
    layout.link_outside_model()
    with running_server(wait_ready=False, models_dir=layout.models, models=models, poll_interval_s=0,
                        warmup=False) as (url, _):
        until(lambda: httpx.get(f"{url}/health/ready", timeout=10).json()["status"] != "loading",
              lambda: "still loading", timeout=60, interval=0.1)
        ready = httpx.get(f"{url}/health/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["status"] == "failed", ready.text
        reason = ready.json()["reason"]
        assert fragment in reason and "outside left out" in reason and ALLOW_HINT in reason, reason


def test_hot_reload_leaves_out_folders_linked_from_outside_and_logs_each_once(layout, caplog):
    caplog.set_level(logging.WARNING)
    poll = 0.2
    with running_server(models_dir=layout.models, version_policy="all", poll_interval_s=poll,
                        warmup=False) as (url, _):
        links = [layout.link_outside_version(), layout.link_outside_model()]
        # A version published the usual way shows when polling has seen the links too.
        place_version(layout.source, layout.models / "resnet18" / ".tmp-3", "resnet18", 3)
        os.rename(layout.models / "resnet18" / ".tmp-3", layout.models / "resnet18" / "3")
        until(lambda: ("resnet18", 3) in served(url), lambda: f"v3 not served: {served(url)}", timeout=60,
              interval=0.1)
        time.sleep(10 * poll)  # several more polls: still refused, and not logged again
        assert served(url) == [("resnet18", 1), ("resnet18", 3)]
        assert [(e["name"], e["version"]) for e in index(url)] == [("resnet18", "1"), ("resnet18", "3")]
    assert_refused_once(caplog, links)


def test_the_load_endpoint_refuses_folders_linked_from_outside(layout):
    with running_server(models_dir=layout.models, version_policy="all", poll_interval_s=0, admin_token=TOKEN,
                        warmup=False) as (url, _):
        layout.link_all()  # after the start: only the load endpoint reads them
        refused = httpx.post(f"{url}/v2/repository/models/outside/load", headers=AUTH, timeout=60)
        assert refused.status_code == 400, refused.text
        assert "leads outside the repository" in refused.json()["error"] and ALLOW_HINT in refused.json()["error"]
        loaded = httpx.post(f"{url}/v2/repository/models/resnet18/load", headers=AUTH, timeout=60)
        assert loaded.status_code == 200 and loaded.json()["versions"] == ["1"], loaded.text  # v2 is not read
        inside = httpx.post(f"{url}/v2/repository/models/linked/load", headers=AUTH, timeout=60)
        assert inside.status_code == 200 and inside.json()["versions"] == ["1"], inside.text
        assert served(url) == [("linked", 1), ("resnet18", 1)]
        assert httpx.post(f"{url}/classify/resnet18/versions/2", content=jpeg(), timeout=60).status_code == 404


def test_allow_symlinks_serves_folders_linked_from_outside(layout, caplog):
    caplog.set_level(logging.WARNING)
    links = layout.link_all()
    with running_server(models_dir=layout.models, version_policy="all", poll_interval_s=0, admin_token=TOKEN,
                        allow_symlinks=True, warmup=False) as (url, _):
        expected = [("linked", 1), ("outside", 1), ("resnet18", 1), ("resnet18", 2)]
        assert served(url) == expected
        assert [(e["name"], int(e["version"])) for e in index(url)] == expected
        loaded = httpx.post(f"{url}/v2/repository/models/outside/load", headers=AUTH, timeout=60)
        assert loaded.status_code == 200 and loaded.json()["versions"] == ["1"], loaded.text
        assert httpx.post(f"{url}/classify/outside", content=jpeg(), timeout=60).status_code == 200
    assert not any(refusals(caplog, link) for link in links)


def test_the_index_shows_paths_and_load_errors_only_to_the_admin(layout):
    with running_server(models_dir=layout.models, poll_interval_s=0, admin_token=TOKEN, warmup=False) as (url, _):
        broken = layout.models / "resnet18" / "2"
        place_version(layout.source, broken, "resnet18", 2)
        (broken / "model.json").write_text("{not json")
        load = httpx.post(f"{url}/v2/repository/models/resnet18/load", headers=AUTH, timeout=60)
        assert load.status_code == 400 and load.json()["code"] == "model_load_failed", load.text

        public = httpx.post(f"{url}/v2/repository/index", timeout=60)
        assert public.status_code == 200
        assert public.json() == [{"name": "resnet18", "version": "1", "state": "READY"},
                                 {"name": "resnet18", "version": "2", "state": "UNAVAILABLE"}]
        assert str(layout.models) not in public.text  # neither paths nor the parser's words

        admin = index(url, AUTH)
        assert [e["path"] for e in admin] == [str(layout.models / "resnet18" / v) for v in ("1", "2")]
        assert str(broken) in admin[1]["reason"] and "manifest is invalid" in admin[1]["reason"], admin

        wrong = httpx.post(f"{url}/v2/repository/index", headers={"Authorization": "Bearer wrong"}, timeout=60)
        assert wrong.status_code == 401 and wrong.json()["code"] == "unauthorized"

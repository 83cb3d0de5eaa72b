"""Static checks of the deployment files: Dockerfile, compose, Prometheus, Grafana, Kubernetes, KServe.

No container engine is needed. ``docker compose config`` runs when the compose plugin is
installed (skipped otherwise); ``promtool`` (Debian's ``prometheus`` package) checks the
Prometheus configuration, the alerting rules and the PromQL of every dashboard, and is
required when ``CI`` is set.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
README = (ROOT / "README.md").read_text()
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
PROVISIONING = DEPLOY / "grafana" / "provisioning"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
K8S = DEPLOY / "k8s"
# Helm values for prometheus-adapter, not a Kubernetes manifest.
ADAPTER_VALUES = K8S / "prometheus-adapter-rules.yaml"
K8S_FILES = sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml") and p != ADAPTER_VALUES)
# The Kubernetes version whose OpenAPI schemas (shipped by kubernetes-validate, offline)
# the built-in kinds are validated against.
K8S_SCHEMA_VERSION = "1.34.0"
# Kinds defined by CRDs (or kustomize): no schema in kubernetes-validate, checked field by field.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "InferenceService", "ServingRuntime", "Kustomization"}

SETTINGS_FIELDS = set(Settings.model_fields)
# Settings the service is being extended with; checked as soon as Settings declares them.
PENDING_SETTINGS = {"store_url"}


# ----------------------------------------------------------------------------- helpers


def exposed_series() -> set[str]:
    """Every series name the service exposes (the dashboards test's helper, reused)."""
    from tests.service.test_dashboards import exposed_series as series

    return series()


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"archserve_[a-z0-9_]+", expr))


class Tagged:
    """A compose merge tag (``!reset`` / ``!override``) and its value."""

    def __init__(self, tag: str, value):
        self.tag, self.value = tag, value


class ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(loader, tag_suffix, node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return Tagged(tag_suffix, value)


ComposeLoader.add_multi_constructor("!", _tagged)


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def interpolate(value: str) -> str:
    """Compose variable interpolation with every variable unset: defaults apply."""
    value = value.replace("$$", "\0")
    value = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    value = re.sub(r"\$([A-Za-z_][A-Za-z0-9_]*)", "", value)
    return value.replace("\0", "$")


def duration_s(value: str | int | float) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value):
        total += float(number) * units[unit]
    return total


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume of a compose service, short or long syntax, interpolated."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = interpolate(volume).split(":")
            out.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
        else:
            out.append((interpolate(str(volume.get("source", ""))), volume["target"]))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def env_of(service: dict) -> dict:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (interpolate(str(v)) if v is not None else None) for k, v in env.items()}


def settings_default(name: str):
    return Settings.model_fields[name].default


def graceful_shutdown_default() -> float:
    return float(settings_default("graceful_shutdown_s"))


def assert_setting_keys(keys, where: str) -> None:
    for key in keys:
        if not key.startswith("ARCHSERVE_"):
            continue
        field = key.removeprefix("ARCHSERVE_").lower()
        if field in PENDING_SETTINGS and field not in SETTINGS_FIELDS:
            continue
        assert field in SETTINGS_FIELDS, f"{where}: {key} is not a service setting (service/settings.py)"


def service_paths() -> set[str]:
    from service.http import health, v2

    return {route.path for router in (health.router, v2.router) for route in router.routes}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found: apt-get install -y prometheus (Debian) provides it"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(message + "; it is required in CI")
        pytest.skip(message)
    return path


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


# ----------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current:
            keyword, _, args = current.partition(" ")
            out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def dockerfile_stages() -> tuple[dict[str, str], dict[str, dict]]:
    """Global ARG defaults, and each stage by name: base image, instructions."""
    global_args, stages, stage = {}, {}, None
    for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            words = args.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), ""), words[0])
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            stage = stages[name] = {"base": base, "instructions": [], "args": {}}
        elif stage is None:
            if keyword == "ARG":
                key, _, default = args.partition("=")
                global_args[key] = default
        else:
            stage["instructions"].append((keyword, args))
            if keyword == "ARG":
                key, _, default = args.partition("=")
                stage["args"][key] = default
    return global_args, stages


def stage_text(stage: dict, *keywords: str) -> str:
    return "\n".join(args for keyword, args in stage["instructions"] if not keywords or keyword in keywords)


def default_export_models() -> list[str]:
    _, stages = dockerfile_stages()
    return stages["export"]["args"]["MODELS"].split(",")


def test_dockerfile_has_an_export_and_a_runtime_stage_from_python_slim():
    _, stages = dockerfile_stages()
    assert list(stages) == ["export", "runtime"]
    for stage in stages.values():
        # A patch version: a rebuild must not pick up another interpreter silently.
        assert re.fullmatch(r"python:3\.11\.\d+-slim", stage["base"]), stage["base"]


def test_runtime_stage_pins_the_cuda_and_cudnn_wheels_the_readme_names():
    _, stages = dockerfile_stages()
    pins = dict(p.split("==") for p in stages["runtime"]["args"]["CUDA_WHEELS"].strip('"').split())
    assert pins["nvidia-cuda-runtime"].startswith("13.0.") and pins["nvidia-cudnn-cu13"].startswith("9.24.")
    assert "CUDA 13.0" in README and "cuDNN 9.24" in README
    assert "${CUDA_WHEELS}" in stage_text(stages["runtime"], "RUN")
    # Every CUDA wheel onnxruntime-gpu's extras ask for is pinned, to a version its specifier allows.
    try:
        requires = importlib.metadata.requires("onnxruntime-gpu") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed on this platform (the CPU onnxruntime is)")
    wanted = [Requirement(r) for r in requires if "extra ==" in r and ("cuda" in r or "cudnn" in r)]
    assert wanted
    for req in wanted:
        assert req.name in pins, f"{req.name} is not pinned in CUDA_WHEELS"
        assert req.specifier.contains(pins[req.name]), f"{req.name}=={pins[req.name]} is outside {req.specifier}"


def test_export_stage_installs_cpu_torch_and_exports_the_default_models():
    _, stages = dockerfile_stages()
    export = stages["export"]
    runs = stage_text(export, "RUN")
    assert "--index-url" in runs and "torch==" in runs
    assert export["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    for package in ("onnx", "onnxscript", "safetensors", "onnxruntime"):
        assert re.search(rf'"{package}[=>]', runs), f"{package} is not installed in the export stage"
    assert 'python -m export --models "${MODELS}" --out /models' in runs
    assert default_export_models() == ["resnet18", "resnet50"]
    copied = stage_text(export, "COPY")
    assert "export/" in copied and "modelrepo/" in copied


def test_runtime_stage_has_no_torch_no_compilers_and_the_gpu_runtime():
    _, stages = dockerfile_stages()
    runtime = stages["runtime"]
    text = stage_text(runtime).lower()
    assert "torch" not in text, "the runtime stage must not install or mention torch"
    for tool in ("gcc", "g++", "build-essential", "apt-get install", "clang", "make "):
        assert tool not in text, f"the runtime stage must not install {tool}"
    runs = stage_text(runtime, "RUN")
    assert '"onnxruntime-gpu[cuda,cudnn]==' in runs
    pip_targets = re.findall(r'"(/tmp/src[^"]*)"', runs)
    assert pip_targets and all("export" not in t and "test" not in t for t in pip_targets)
    extras = {e for e in runtime["args"].get("ARCHSERVE_EXTRAS", "").split(",") if e}
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not extras & {"export", "test"}, "the runtime image must not install the export or test extras"
    assert extras <= set(declared), f"pyproject.toml declares no extra {extras - set(declared)}"
    copied = stage_text(runtime, "COPY")
    assert "export/" not in copied.replace("--from=export", ""), "export/ (torch code) must stay out of the image"


def test_runtime_stage_runs_the_service_as_a_non_root_user_with_a_healthcheck():
    _, stages = dockerfile_stages()
    instructions = stages["runtime"]["instructions"]
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1].split(":")[0] == "10001", "k8s runAsUser and the Dockerfile's USER must agree"
    healthcheck = stage_text(stages["runtime"], "HEALTHCHECK")
    assert "/health/ready" in healthcheck and "urllib" in healthcheck and "curl" not in healthcheck
    assert "/health/ready" in service_paths()
    cmd = [args for keyword, args in instructions if keyword == "CMD"][-1]
    assert json.loads(cmd) == ["python", "-m", "service"]
    assert "8000" in stage_text(stages["runtime"], "EXPOSE").split()
    assert re.search(r"--from=export\b.* /models /models$", stage_text(stages["runtime"], "COPY"), re.M)


def test_runtime_stage_env_defaults():
    _, stages = dockerfile_stages()
    env = dict(shlex.split(pair)[0].split("=", 1) for pair in re.findall(
        r"(\w+=\S+)", stage_text(stages["runtime"], "ENV")))
    assert env["ARCHSERVE_HOST"] == "0.0.0.0"
    assert env["ARCHSERVE_MODELS_DIR"] == "/models"
    assert env["ARCHSERVE_STORE_PATH"] == "/data/experiments.sqlite3"
    assert "NVIDIA_VISIBLE_DEVICES" not in env
    assert_setting_keys(env, "Dockerfile ENV")


def test_dockerignore_keeps_out_local_state_but_not_what_the_dockerfile_copies():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in (".venv", ".git", "models", ".env"):
        assert needed in patterns
    _, stages = dockerfile_stages()
    for stage in stages.values():
        for keyword, args in stage["instructions"]:
            if keyword != "COPY" or "--from=" in args:
                continue
            sources = [w for w in args.split() if not w.startswith("--")][:-1]
            for source in sources:
                top = source.strip("/").split("/")[0]
                assert top not in patterns, f".dockerignore excludes {source}, which the Dockerfile copies"
                assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"


# ----------------------------------------------------------------------------- compose


def test_compose_parses_with_the_whole_stack():
    compose = load_compose(COMPOSE)
    services = compose["services"]
    for name in ("archserve", "prometheus", "grafana", "postgres", "archserve-replica", "export"):
        assert name in services, f"docker-compose.yml has no {name} service"
    assert services["postgres"]["image"] == "postgres:16"
    assert services["postgres"]["profiles"] == ["replicas"]
    assert services["archserve-replica"]["profiles"] == ["replicas"]
    assert services["export"]["profiles"] == ["export"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name in ("archserve", "prometheus", "grafana"):
        assert "profiles" not in services[name], f"{name} must start with a plain `docker compose up`"
    build = services["archserve"]["build"]
    assert build["context"] == "." and build["target"] == "runtime"
    assert services["export"]["build"]["target"] == "export"


@pytest.mark.parametrize("name", ["archserve", "archserve-replica"])
def test_compose_archserve_service(name):
    compose = load_compose(COMPOSE)
    service = compose["services"][name]
    assert any(interpolate(p).endswith(":8000") for p in service["ports"])
    targets = {target: source for source, target in mounts(service)}
    assert "/models" in targets and "/data" in targets
    env = env_of(service)
    assert env["ARCHSERVE_HOST"] == "0.0.0.0"
    assert env["ARCHSERVE_MODELS_DIR"] == "/models"
    assert env["ARCHSERVE_STORE_PATH"].startswith("/data/")
    assert "ARCHSERVE_STORE_URL" in env, "ARCHSERVE_STORE_URL must be passed through (profile replicas)"
    assert_setting_keys(env, f"docker-compose.yml {name}")
    test = " ".join(service["healthcheck"]["test"])
    assert "/health/ready" in test and "/health/ready" in service_paths()
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    graceful = float(env.get("ARCHSERVE_GRACEFUL_SHUTDOWN_S") or graceful_shutdown_default())
    assert duration_s(service["stop_grace_period"]) > graceful, "Docker would kill the drain"


def test_every_file_compose_mounts_exists_and_named_volumes_are_declared():
    compose = load_compose(COMPOSE)
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source, target in mounts(service):
            if not source:
                continue
            if is_bind(source):
                assert (ROOT / source).resolve().exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in declared, f"{name} uses volume {source}, not declared under volumes:"


def test_cpu_override_drops_the_gpu_reservation():
    base, cpu = load_compose(COMPOSE), load_compose(COMPOSE_CPU)
    assert set(cpu["services"]) <= set(base["services"])
    for name, service in cpu["services"].items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert isinstance(devices, Tagged) and devices.tag == "reset" and devices.value == []
        assert service["environment"]["ARCHSERVE_DEVICE"] == "cpu"
        assert "deploy" in base["services"][name], f"{name} has no GPU reservation to drop"
    assert {"archserve", "archserve-replica"} <= set(cpu["services"])


# `docker compose config` needs the compose plugin, which our machines lack; the schema-level
# checks above stand in for it (see the README's Deploy section).


# ----------------------------------------------------------------------------- Prometheus


def test_prometheus_config_scrapes_archserve_metrics():
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "archserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics" and "/metrics" in service_paths()
    targets = {f"{name}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for name in sd["names"]}
    targets |= {t for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert "archserve:8000" in targets and "archserve-replica:8000" in targets
    compose = load_compose(COMPOSE)
    prometheus = compose["services"]["prometheus"]
    config_flag = [a for a in prometheus["command"] if a.startswith("--config.file=")][0]
    mounted = {target: source for source, target in mounts(prometheus)}
    assert (ROOT / mounted[config_flag.split("=", 1)[1]]).resolve() == PROMETHEUS
    # rule files are relative to the config file, in the container and in the repository alike
    config_dir = Path(config_flag.split("=", 1)[1]).parent
    for pattern in config["rule_files"]:
        in_container = (config_dir / pattern).parent.as_posix()
        assert in_container in mounted
        assert (ROOT / mounted[in_container]).resolve() == (PROMETHEUS.parent / pattern).parent


def test_promtool_checks_the_config_and_the_rules():
    tool = promtool()
    result = run([tool, "check", "config", str(PROMETHEUS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert RULES
    result = run([tool, "check", "rules", *map(str, RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def rule_exprs(groups) -> list[str]:
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_alert_rules_use_exposed_series_and_match_the_prometheus_operator_copy():
    series = exposed_series()
    groups = [g for path in RULES for g in yaml.safe_load(path.read_text())["groups"]]
    for expr in rule_exprs(groups):
        for name in metric_names(expr):
            assert name in series, f"alert rule uses {name}, which the service does not expose"
    (rule,) = [d for d in yaml.safe_load_all((K8S / "base" / "prometheusrule.yaml").read_text()) if d]
    assert rule["spec"]["groups"] == groups, "deploy/k8s/prometheusrule.yaml differs from deploy/prometheus/rules/"


# ----------------------------------------------------------------------------- Grafana


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards_folder():
    compose = load_compose(COMPOSE)
    grafana = {target: source for source, target in mounts(compose["services"]["grafana"])}
    assert (ROOT / grafana["/etc/grafana/provisioning"]).resolve() == PROVISIONING

    datasources = [ds for path in sorted((PROVISIONING / "datasources").glob("*.y*ml"))
                   for ds in yaml.safe_load(path.read_text())["datasources"]]
    (prometheus,) = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090" and prometheus.get("isDefault")
    assert "prometheus" in compose["services"]

    providers = [p for path in sorted((PROVISIONING / "dashboards").glob("*.y*ml"))
                 for p in yaml.safe_load(path.read_text())["providers"]]
    assert providers
    for provider in providers:
        assert provider["type"] == "file"
        path = provider["options"]["path"]
        assert path in grafana, f"dashboard provider path {path} is not mounted into grafana"
        host = (ROOT / grafana[path]).resolve()
        assert host.is_dir() and host == DASHBOARD_DIR
        assert list(host.glob("*.json"))
    home = env_of(compose["services"]["grafana"]).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        (provider_path,) = {p["options"]["path"] for p in providers}
        assert home.startswith(provider_path + "/")
        assert (DASHBOARD_DIR / home.rsplit("/", 1)[1]).is_file()


def all_panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside (collapsed) rows
    return out


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for panel in all_panels(dashboard) for t in panel.get("targets", []) if t.get("expr")]


def variable_queries(dashboard: dict) -> list[str]:
    out = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_use_exposed_series(path):
    dashboard = json.loads(path.read_text())
    series = exposed_series()
    exprs = dashboard_exprs(dashboard)
    assert exprs and dashboard["uid"] and dashboard["title"]
    for expr in exprs + variable_queries(dashboard):
        for name in metric_names(expr):
            assert name in series, f"{path.name}: {name} is not exposed by the service"
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), f"{path.name}: panel ids must be unique"
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            uid = (target.get("datasource") or panel.get("datasource") or {}).get("uid", "")
            assert uid == "${datasource}" and "datasource" in variables, \
                f"{path.name}: panel {panel['id']} must use the $datasource variable"


def test_model_info_queries_count_only_series_at_1():
    """With several workers a retired version's model info stays in the scrape at 0 (prometheus-client cannot
    remove a series in multiprocess mode): every dashboard and alert query that counts or lists it filters == 1."""
    groups = [g for path in RULES for g in yaml.safe_load(path.read_text())["groups"]]
    exprs = list(rule_exprs(groups)) + [e for path in DASHBOARDS for e in dashboard_exprs(json.loads(path.read_text()))]
    uses = [(expr, m) for expr in exprs for m in re.finditer(r"archserve_model_info(\{[^}]*\})?", expr)]
    assert len(uses) >= 4
    for expr, match in uses:
        assert expr[match.end():].lstrip().startswith("== 1"), f"archserve_model_info without '== 1' in: {expr}"


def test_dashboard_uids_are_unique():
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))
    assert {"archserve-ab", "archserve-serving"} <= set(uids)


def test_serving_dashboard_covers_latency_by_stage_throughput_batching_queues_errors_and_models():
    dashboard = json.loads((DASHBOARD_DIR / "archserve-serving.json").read_text())
    used = set().union(*(metric_names(e) for e in dashboard_exprs(dashboard)))
    for name in ("archserve_request_duration_seconds_bucket", "archserve_preprocess_duration_seconds_bucket",
                 "archserve_queue_wait_seconds_bucket", "archserve_inference_duration_seconds_bucket",
                 "archserve_images_total", "archserve_batch_size_bucket", "archserve_queue_depth",
                 "archserve_inflight_requests", "archserve_requests_total", "archserve_model_info",
                 "archserve_ready", "archserve_alone_batches_total"):
        assert name in used, f"the serving dashboard does not show {name}"
    exprs = dashboard_exprs(dashboard)
    for quantile in ("0.5", "0.99"):
        assert any(f"histogram_quantile({quantile}, sum by (le, model) (rate(archserve_request_duration" in e
                   for e in exprs)
    assert any("by (code)" in e and "archserve_requests_total" in e for e in exprs)
    (table,) = [p for p in all_panels(dashboard) if p["type"] == "table"]
    (expr,) = [t["expr"] for t in table["targets"]]
    for label in ("provider", "precision", "weights"):
        assert label in expr


def promql_for_promtool(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, so that Prometheus can parse it."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", lambda m: "1h" if m.group(1) == "range" else "1m", expr)
    return re.sub(r"\$\{?\w+\}?", "x", expr)


def test_promtool_parses_every_dashboard_query(tmp_path):
    tool = promtool()
    rules = []
    for path in DASHBOARDS:
        for i, expr in enumerate(dashboard_exprs(json.loads(path.read_text()))):
            rules.append({"record": f"dashboard:{path.stem.replace('-', '_')}:{i}", "expr": promql_for_promtool(expr)})
    rules_file = tmp_path / "dashboards.rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = run([tool, "check", "rules", str(rules_file)])
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- Kubernetes


def k8s_documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def k8s_objects(kind: str, files: list[Path] | None = None) -> list[dict]:
    return [doc for path, doc in k8s_documents()
            if doc.get("kind") == kind and (files is None or path in files)]


def base_files() -> list[Path]:
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    return [K8S / "base" / r for r in kustomization["resources"]]


def one(kind: str) -> dict:
    (obj,) = k8s_objects(kind, base_files())
    return obj


def test_every_kubernetes_manifest_parses_with_the_required_fields():
    assert K8S_FILES
    docs = k8s_documents()
    kinds = {doc["kind"] for _, doc in docs}
    for kind in ("Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler",
                 "PodDisruptionBudget", "ServiceMonitor", "InferenceService", "Kustomization"):
        assert kind in kinds, f"deploy/k8s has no {kind}"
    for path, doc in docs:
        where = path.relative_to(ROOT)
        assert doc.get("apiVersion") and doc.get("kind"), f"{where}: apiVersion and kind are required"
        if doc["kind"] == "Kustomization":
            continue
        assert doc.get("metadata", {}).get("name"), f"{where}: metadata.name is required"


@pytest.mark.parametrize("path", sorted(K8S.rglob("kustomization.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomizations_reference_existing_files(path):
    kustomization = yaml.safe_load(path.read_text())
    for entry in kustomization.get("resources", []):
        assert (path.parent / entry).exists(), f"{path.relative_to(ROOT)}: {entry} does not exist"
    for patch in kustomization.get("patches", []):
        assert (path.parent / patch["path"]).is_file()
    if "../.." in kustomization.get("resources", []):
        # a patch must target an object of the base
        for patch in kustomization.get("patches", []):
            target = yaml.safe_load((path.parent / patch["path"]).read_text())
            names = {(d["kind"], d["metadata"]["name"]) for d in k8s_objects(target["kind"], base_files())}
            assert (target["kind"], target["metadata"]["name"]) in names


def pod_spec() -> dict:
    return one("Deployment")["spec"]["template"]["spec"]


def container() -> dict:
    (c,) = pod_spec()["containers"]
    return c


def configmap_env() -> dict:
    return next(cm["data"] for cm in k8s_objects("ConfigMap", base_files()) if cm["metadata"]["name"] == "archserve-env")


def probe_port(probe: dict, c: dict) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in c["ports"] if p.get("name") == port]
    return port


def test_deployment_probes_match_the_service_endpoints():
    deployment = one("Deployment")
    assert deployment["spec"]["replicas"] == 2
    c = container()
    paths = service_paths()
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in c:
            assert c[probe]["httpGet"]["path"] in paths
            assert probe_port(c[probe], c) == int(configmap_env()["ARCHSERVE_PORT"]) == 8000


def test_deployment_grace_period_exceeds_prestop_plus_graceful_shutdown():
    spec, c = pod_spec(), container()
    graceful = float(configmap_env().get("ARCHSERVE_GRACEFUL_SHUTDOWN_S", graceful_shutdown_default()))
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop > 0
    assert spec["terminationGracePeriodSeconds"] > graceful + pre_stop
    assert spec["terminationGracePeriodSeconds"] > graceful_shutdown_default()


def test_deployment_gpu_env_secret_and_volumes():
    spec, c = pod_spec(), container()
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    sources = {(k, v["name"]) for ref in c["envFrom"] for k, v in ref.items()}
    assert ("configMapRef", "archserve-env") in sources and ("secretRef", "archserve-secrets") in sources
    names = {(o["kind"], o["metadata"]["name"]) for o in k8s_objects("ConfigMap", base_files())
             + k8s_objects("Secret", base_files())}
    assert ("ConfigMap", "archserve-env") in names and ("Secret", "archserve-secrets") in names
    secret = one("Secret")
    assert {"ARCHSERVE_ADMIN_TOKEN", "ARCHSERVE_STORE_URL"} <= set(secret["stringData"])
    assert secret["stringData"]["ARCHSERVE_STORE_URL"].startswith("postgresql://")
    assert_setting_keys(configmap_env(), "configmap.yaml")
    assert_setting_keys(secret["stringData"], "secret.yaml")
    assert configmap_env()["ARCHSERVE_HOST"] == "0.0.0.0"
    volumes = {v["name"] for v in spec["volumes"]}
    for mount in c["volumeMounts"]:
        assert mount["name"] in volumes
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    experiments_dir = configmap_env()["ARCHSERVE_EXPERIMENTS_FILE"].rsplit("/", 1)[0]
    assert any(m["mountPath"] == experiments_dir for m in c["volumeMounts"])


def test_the_experiments_configmap_is_valid_for_the_default_image():
    from service.experiments.config import load_experiments

    (cm,) = [cm for cm in k8s_objects("ConfigMap", base_files()) if cm["metadata"]["name"] == "archserve-experiments"]
    file_name = configmap_env()["ARCHSERVE_EXPERIMENTS_FILE"].rsplit("/", 1)[1]
    served = set(default_export_models())
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"archserve-test-{os.getpid()}-{file_name}"
    path.write_text(cm["data"][file_name])
    try:
        experiments = load_experiments(path, lambda m, v: None if m in served else f"{m} not served")
    finally:
        path.unlink()
    assert experiments


def test_service_hpa_pdb_and_servicemonitor_select_the_deployment():
    deployment, service = one("Deployment"), one("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(service["spec"]["selector"])
    port_names = {p["name"] for p in container()["ports"]}
    assert all(p["targetPort"] in port_names or p["targetPort"] == 8000 for p in service["spec"]["ports"])
    assert selects(one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["metrics"]
    if any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"]):
        assert "cpu" in container()["resources"]["requests"], "CPU utilisation needs a CPU request"
    monitor = one("ServiceMonitor")
    assert all(monitor["spec"]["selector"]["matchLabels"][k] == v for k, v in
               monitor["spec"]["selector"]["matchLabels"].items() if service["metadata"]["labels"].get(k) == v)
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert {e.get("path", "/metrics") for e in monitor["spec"]["endpoints"]} == {"/metrics"}


def test_kserve_container_inference_service_runs_the_archserve_image_with_the_v2_protocol():
    (isvc,) = k8s_objects("InferenceService", [K8S / "kserve-inferenceservice-container.yaml"])
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container"
    assert c["image"].rsplit(":", 1)[0].endswith("archserve")
    assert [p["containerPort"] for p in c["ports"]] == [8000]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env["PROTOCOL"] == "v2"
    paths = service_paths()
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in paths and c[probe]["httpGet"]["port"] == 8000
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    graceful = float(configmap_env().get("ARCHSERVE_GRACEFUL_SHUTDOWN_S", graceful_shutdown_default()))
    assert predictor["terminationGracePeriodSeconds"] > graceful + float(c["lifecycle"]["preStop"]["exec"]["command"][1])


def test_kserve_serving_runtime_serves_the_v2_protocol_from_mnt_models():
    (runtime,) = k8s_objects("ServingRuntime")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert "onnx" in formats and formats["onnx"].get("autoSelect") is False
    (c,) = spec["containers"]
    assert c["name"] == "kserve-container"
    assert c["image"].rsplit(":", 1)[0].endswith("archserve")
    assert [p["containerPort"] for p in c["ports"]] == [8000]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    # KServe's storage initializer puts storageUri there; `env` wins over the envFrom ConfigMap.
    assert env["ARCHSERVE_MODELS_DIR"] == "/mnt/models"
    assert env.get("ARCHSERVE_PORT", "8000") == "8000"
    assert_setting_keys({k: v for k, v in env.items() if k.startswith("ARCHSERVE_")}, "kserve-servingruntime.yaml")
    sources = {(k, v["name"]) for ref in c["envFrom"] for k, v in ref.items()}
    assert ("configMapRef", "archserve-env") in sources and ("secretRef", "archserve-secrets") in sources
    paths = service_paths()
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in paths and c[probe]["httpGet"]["port"] == 8000
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    volumes = {v["name"] for v in spec["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} <= volumes
    experiments_dir = configmap_env()["ARCHSERVE_EXPERIMENTS_FILE"].rsplit("/", 1)[0]
    assert any(m["mountPath"] == experiments_dir for m in c["volumeMounts"])
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])


def test_kserve_inference_service_uses_the_archserve_runtime_with_a_model_repository():
    (runtime,) = k8s_objects("ServingRuntime")
    (isvc,) = k8s_objects("InferenceService", [K8S / "kserve-inferenceservice.yaml"])
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    assert "containers" not in predictor
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"] == "archserve-runtime"
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["protocolVersion"] == "v2"
    assert re.match(r"^(pvc|s3|gs|https?)://[^/]+", model["storageUri"])
    if model["storageUri"].startswith("pvc://"):
        claim = model["storageUri"][len("pvc://"):].split("/", 1)[0]
        assert claim in {p["metadata"]["name"] for p in k8s_objects("PersistentVolumeClaim")}
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    (c,) = runtime["spec"]["containers"]
    graceful = float(configmap_env().get("ARCHSERVE_GRACEFUL_SHUTDOWN_S", graceful_shutdown_default()))
    assert predictor["terminationGracePeriodSeconds"] > graceful + float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert predictor["securityContext"]["runAsNonRoot"] is True


def adapter_rules() -> list[dict]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    return values["rules"]["custom"]


def rule_series(rule: dict) -> str:
    return re.match(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)


def exposed_name(rule: dict) -> str:
    """The custom metric name a prometheus-adapter rule exposes (`name.as`, else the series')."""
    return rule.get("name", {}).get("as") or rule_series(rule)


def test_hpa_scales_on_a_per_pod_prometheus_metric_with_cpu_as_fallback():
    hpa = one("HorizontalPodAutoscaler")
    metrics = hpa["spec"]["metrics"]
    (pods,) = [m["pods"] for m in metrics if m["type"] == "Pods"]
    assert pods["target"]["type"] == "AverageValue" and float(pods["target"]["averageValue"]) > 0
    (cpu,) = [m["resource"] for m in metrics if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu["target"]["type"] == "Utilization" and 0 < cpu["target"]["averageUtilization"] <= 100
    assert "cpu" in container()["resources"]["requests"]

    # The adapter rule that exposes the HPA's metric, per pod, from a series the service exposes.
    rules = [r for r in adapter_rules() if exposed_name(r) == pods["metric"]["name"]]
    assert len(rules) == 1, f"no prometheus-adapter rule exposes {pods['metric']['name']}"
    (rule,) = rules
    series = rule_series(rule)
    assert series in exposed_series()
    assert series in {"archserve_inflight_requests", "archserve_queue_depth"}
    assert re.match(rule["name"]["matches"], series)
    overrides = rule["resources"]["overrides"]
    assert overrides["pod"] == {"resource": "pod"} and overrides["namespace"] == {"resource": "namespace"}
    query = rule["metricsQuery"]
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in query
    # A gauge: no rate(); summed over the model/version labels into one value per pod.
    assert "rate(" not in query and re.search(r"\bsum\b", query)
    # The Helm values are not a manifest: keep them out of every kustomization.
    for path in K8S.rglob("kustomization.yaml"):
        resources = yaml.safe_load(path.read_text()).get("resources", [])
        assert ADAPTER_VALUES.name not in resources


def test_the_promql_of_the_adapter_rules_parses(tmp_path):
    tool = promtool()
    rules = []
    for i, rule in enumerate(adapter_rules()):
        expr = (rule["metricsQuery"].replace("<<.Series>>", rule_series(rule))
                .replace("<<.LabelMatchers>>", 'namespace="archserve",pod=~"archserve-.*"')
                .replace("<<.GroupBy>>", "namespace, pod"))
        rules.append({"record": f"adapter:rule:{i}", "expr": expr})
    rules_file = tmp_path / "adapter.rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    result = run([tool, "check", "rules", str(rules_file)])
    assert result.returncode == 0, result.stdout + result.stderr


def patch_files() -> set[Path]:
    return {(path.parent / patch["path"]).resolve()
            for path in K8S.rglob("kustomization.yaml")
            for patch in yaml.safe_load(path.read_text()).get("patches", []) if "path" in patch}


def builtin_documents() -> list[tuple[Path, dict]]:
    patches = patch_files()
    return [(path, doc) for path, doc in k8s_documents()
            if doc["kind"] not in CRD_KINDS and path.resolve() not in patches]


def schema_errors(doc: dict) -> str | None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(str(p) for p in e.path)}: {e.message}"
    return None


def test_every_builtin_kind_manifest_matches_the_kubernetes_schema():
    """Offline: kubernetes-validate ships the OpenAPI schemas of each Kubernetes release."""
    importlib.import_module("kubernetes_validate")
    docs = builtin_documents()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "Secret", "Namespace", "Job", "PersistentVolumeClaim"} <= kinds
    errors = []
    for path, doc in docs:
        error = schema_errors(doc)
        if error:
            errors.append(f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']}: {error}")
    assert not errors, "\n".join(errors)
    # and strict mode does catch a misplaced field
    broken = json.loads(json.dumps(one("HorizontalPodAutoscaler")))
    broken["spec"]["metrics"][0]["pods"]["metric"]["nmae"] = "x"
    assert schema_errors(broken)


def test_every_other_kind_is_a_known_crd():
    """What kubernetes-validate cannot check must be one of the CRD kinds the tests above check."""
    patches = patch_files()
    for path, doc in k8s_documents():
        if path.resolve() in patches:
            continue
        group = doc["apiVersion"].rpartition("/")[0]
        if "." in group:   # built-in groups (apps, batch, policy, autoscaling, core) have no dot
            assert doc["kind"] in CRD_KINDS, (
                f"{path.relative_to(ROOT)}: {doc['apiVersion']} {doc['kind']} is neither built in nor a checked CRD")


@pytest.mark.skipif(shutil.which("kubectl") is None and not os.environ.get("CI"),
                    reason="kubectl (for kubectl kustomize) not installed")
@pytest.mark.parametrize("path", sorted(K8S.rglob("kustomization.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomize_output_matches_the_kubernetes_schema(path):
    """The rendered kustomizations, patches applied, through the same offline schemas."""
    importlib.import_module("kubernetes_validate")
    result = run(["kubectl", "kustomize", str(path.parent)])
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert any(d["kind"] == "Deployment" for d in docs)
    errors = [f"{d['kind']}/{d['metadata']['name']}: {e}" for d in docs
              if d["kind"] not in CRD_KINDS and (e := schema_errors(d))]
    assert not errors, "\n".join(errors)
    assert all(d["metadata"].get("namespace") == "archserve" for d in docs if d["kind"] != "Namespace")


@pytest.mark.parametrize(("system", "machine", "runtime"), [
    ("linux", "x86_64", "onnxruntime-gpu"), ("win32", "AMD64", "onnxruntime-gpu"),
    ("darwin", "arm64", "onnxruntime"), ("darwin", "x86_64", "onnxruntime"), ("linux", "aarch64", "onnxruntime"),
])
def test_each_platform_gets_exactly_one_onnxruntime_that_has_wheels_there(system, machine, runtime):
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    env = {"sys_platform": system, "platform_machine": machine}
    chosen = [d.name for d in deps if d.name.startswith("onnxruntime") and (d.marker is None or d.marker.evaluate(env))]
    assert chosen == [runtime]


def test_the_grpc_port_is_published_wherever_the_http_port_is():
    grpc = Settings().grpc_port
    _, stages = dockerfile_stages()
    assert str(grpc) in stage_text(stages["runtime"], "EXPOSE").split()
    compose = load_compose(COMPOSE)
    published = [interpolate(p).split(":") for name in ("archserve", "archserve-replica")
                 for p in compose["services"][name]["ports"]]
    assert sum(target == str(grpc) for _, target in published) == 2
    hosts = [host for host, _ in published]
    assert len(hosts) == len(set(hosts)), f"two services publish the same host port: {hosts}"
    assert {"name": "grpc", "containerPort": grpc, "protocol": "TCP"} in container()["ports"]
    assert any(p["targetPort"] == "grpc" and p["port"] == grpc for p in one("Service")["spec"]["ports"])

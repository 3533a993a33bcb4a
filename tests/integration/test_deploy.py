"""The deployment artefacts: Dockerfile, Kubernetes manifests and deploy/DEPLOY.md.

(a) Every manifest under deploy/kubernetes validates, strictly (unknown fields are errors),
    against the newest Kubernetes API schema kubernetes-validate ships; every YAML file there
    is a manifest, a kustomization, a patch or a generator source that a kustomization names;
    the kustomizations use only what kustomize v2.0.3 (kubectl 1.20) understands.
(b) `kubectl kustomize` renders the example overlay, the StatefulSet variant and the base,
    and the rendered objects validate too (skipped without kubectl; set MQP_TEST_KUBECTL to
    a os.pathsep-separated list of kubectl binaries to render with several versions).
(c) The Dockerfile's `build` stage RUN steps, run in a scratch directory with the same
    commands (paths mapped), build a wheel and install it without extras into a fresh
    virtualenv (network to PyPI needed: minutes at worst); `check-config` accepts the
    ConfigMap's config.yaml with the environment the Deployment gives the proxy. The
    runtime stage's USER, ENTRYPOINT and HEALTHCHECK are checked by parsing the file.
(d) The pod, simulated: the upstream and the proxy run as two local processes with the
    command, arguments, environment and configuration of the rendered Deployment and
    ConfigMap (the image's ENTRYPOINT/CMD/ENV/WORKDIR from the Dockerfile where the
    container does not set them; volumes are directories). What differs from the manifests,
    and only that: listen.host 127.0.0.1 instead of 0.0.0.0, the test's redis.key_prefix,
    REDIS_URL = the test's Redis and test values for the other Secret keys, mount paths
    mapped to their directories (spool.path, MQP_CONFIG, TMPDIR, WORKDIR), STRIPE_API_BASE
    pointing at the Stripe test double, and the ports only if 8000/8080 are taken here.
    A tenant and a key are created with DEPLOY.md's commands, a tool call goes through the
    proxy, its usage reaches the Stripe double, and SIGTERM stops the proxy within the pod's
    grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.billing.plansync import SUBSCRIPTION_EVENTS
from proxy.config import Config, parse_config
from proxy.usage.runner import CHILD_GRACE_S
from tests.conftest import PEPPER
from tests.fakes.stripe_fake import run_stripe_fake
from tests.mcp_peers import call_tool
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
DEPLOY_MD = ROOT / "deploy" / "DEPLOY.md"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
OVERLAY = "overlays/example"
BUILDS = (OVERLAY, "statefulset", "base")
EXAMPLES = {"base/secret.example.yaml"}  # manifests shown, never applied: validated anyway

# Custom resources: kubernetes-validate ships the core API's schemas only, so it raises
# SchemaNotFoundError for these. They are allowed for that reason alone (and get the
# cross-reference checks of test_servicemonitor_scrapes_the_proxy_port instead).
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "Prometheus Operator CRD, no core schema",
}
# Fields of a kustomization that kustomize v2.0.3 (kubectl 1.20) knows. `patches`, `labels`,
# `components`, `replacements` and a directory under `resources` came later.
KUSTOMIZE_V2_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "bases",
    "namespace",
    "namePrefix",
    "nameSuffix",
    "commonLabels",
    "commonAnnotations",
    "images",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "patchesStrategicMerge",
    "patchesJson6902",
    "vars",
    "crds",
}
# python:3.12-slim's own environment (docker inspect), under the Dockerfile's ENV lines.
BASE_IMAGE_ENV = {
    "PATH": "/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
VENV_IN_IMAGE = "/opt/mcp-quota-proxy"
# Values for the Secret's keys in the pod simulation (REDIS_URL: the test's Redis).
STRIPE_TEST_KEY = "sk_test_pod_simulation"
WEBHOOK_TEST_SECRET = "whsec_pod_simulation"


# --------------------------------------------------------------------------- YAML helpers


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomizations() -> dict[Path, dict[str, Any]]:
    return {
        p.parent: yaml.safe_load(p.read_text()) for p in sorted(K8S.rglob("kustomization.yaml"))
    }


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [dict(c) for c in pod["containers"] if c["name"] == name]
    return c


def _config(text: str) -> Config:
    env = {"REDIS_URL": "redis://redis:6379/0", "MQP_KEY_PEPPER": PEPPER}
    return parse_config(yaml.safe_load(text), {**env, "STRIPE_SECRET_KEY": "sk_test_x"})


def _validator() -> Any:
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate: pip install -e '.[test]'"
    )


def _validate(doc: dict[str, Any], where: str) -> None:
    """Strict schema validation; only the CRDs listed in CRDS may have no schema."""
    kv = _validator()
    try:
        kv.validate(doc, kv.latest_version(), strict=True)
    except kv.SchemaNotFoundError:
        assert (doc["apiVersion"], doc["kind"]) in CRDS, f"{where}: no schema for {doc['kind']}"
    except kv.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")


# --------------------------------------------------------------------------- (a) manifests


@dataclass
class Layout:
    """What the kustomizations say each YAML file under deploy/kubernetes is."""

    resources: set[Path] = field(default_factory=set)
    patches: set[Path] = field(default_factory=set)
    generator_sources: set[Path] = field(default_factory=set)


def _layout() -> Layout:
    layout = Layout()
    for folder, k in _kustomizations().items():
        for entry in k.get("resources", []):
            path = (folder / entry).resolve()
            assert path.is_file(), f"{folder}: resource {entry} is not a file (kustomize v2)"
            layout.resources.add(path)
        for entry in k.get("bases", []):
            path = (folder / entry).resolve()
            assert (path / "kustomization.yaml").is_file(), f"{folder}: base {entry}"
        for entry in k.get("patchesStrategicMerge", []):
            path = (folder / entry).resolve()
            assert path.is_file(), f"{folder}: patch {entry} is missing"
            layout.patches.add(path)
        for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
            for entry in gen.get("files", []):
                path = (folder / entry.split("=")[-1]).resolve()
                assert path.is_file(), f"{folder}: generator file {entry} is missing"
                layout.generator_sources.add(path)
    return layout


def test_every_yaml_file_is_accounted_for_and_kustomize_v2_compatible() -> None:
    layout = _layout()
    examples = {(K8S / e).resolve() for e in EXAMPLES}
    known = layout.resources | layout.patches | layout.generator_sources | examples
    for path in sorted(K8S.rglob("*.y*ml")):
        if path.name == "kustomization.yaml":
            k = yaml.safe_load(path.read_text())
            unknown = set(k) - KUSTOMIZE_V2_FIELDS
            assert not unknown, f"{path}: {sorted(unknown)} are unknown to kustomize v2.0.3"
            continue
        assert path.resolve() in known, f"{path}: no kustomization uses it"
    for path in layout.patches:
        for doc in _docs(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a patch"


def _manifest_files() -> list[Path]:
    layout = _layout()
    return sorted(layout.resources | {(K8S / e).resolve() for e in EXAMPLES})


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(K8S.resolve())))
def test_manifest_validates_against_the_newest_kubernetes_schema(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        _validate(doc, str(path.relative_to(ROOT)))


def test_kubernetes_validate_knows_a_current_kubernetes() -> None:
    kv = _validator()
    major, minor = (int(x) for x in kv.latest_version().split(".")[:2])
    assert (major, minor) >= (1, 30), kv.latest_version()


# --------------------------------------------------------------------------- (b) rendering


def _kubectls() -> list[str]:
    listed = os.environ.get("MQP_TEST_KUBECTL")
    if listed:
        return [k for k in listed.split(os.pathsep) if k]
    found = shutil.which("kubectl")
    return [found] if found else []


NO_KUBECTL = (
    "kubectl is not installed: apt-get install -y kubernetes-client "
    "(kubectl 1.20 with kustomize v2.0.3), or set MQP_TEST_KUBECTL"
)


@cache
def _render(kubectl: str, build: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / build)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{kubectl} kustomize {build}: {result.stderr}"
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def _rendered(build: str) -> list[dict[str, Any]] | None:
    kubectls = _kubectls()
    return copy.deepcopy(list(_render(kubectls[0], build))) if kubectls else None


@pytest.mark.parametrize("build", BUILDS)
def test_kustomize_build_renders_valid_objects(build: str) -> None:
    kubectls = _kubectls()
    if not kubectls:
        pytest.skip(NO_KUBECTL)
    for kubectl in kubectls:
        docs = _render(kubectl, build)
        kinds = sorted(d["kind"] for d in docs)
        for doc in docs:
            _validate(doc, f"{kubectl} kustomize {build}")
        workload = "StatefulSet" if build == "statefulset" else "Deployment"
        assert {"ConfigMap", "Service", "PodDisruptionBudget", workload} <= set(kinds)
        assert "Secret" not in kinds, "apply -k must never overwrite the operator's Secret"
        if build == OVERLAY:
            namespace = yaml.safe_load((K8S / OVERLAY / "kustomization.yaml").read_text())
            assert all(d["metadata"]["namespace"] == namespace["namespace"] for d in docs)
            assert {"ServiceMonitor", "Ingress", "PersistentVolumeClaim"} <= set(kinds)
            _check_rendered_overlay(list(docs))


def _check_rendered_overlay(docs: list[dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((K8S / OVERLAY / "kustomization.yaml").read_text())
    deployment = _one(docs, "Deployment", "mcp-quota-proxy")
    pod = deployment["spec"]["template"]["spec"]
    images = {c["name"]: c["image"] for c in pod["containers"]}
    wanted = {f"{i['newName']}:{i['newTag']}" for i in kustomization["images"]}
    assert set(images.values()) == wanted, images
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    configmap = _one(docs, "ConfigMap", volume["configMap"]["name"])  # the hashed name
    overlay_config = (K8S / OVERLAY / "config.yaml").read_text()
    assert configmap["data"]["config.yaml"] == overlay_config  # behavior: replace


# ----------------------------------------------------------- the pod the manifests describe


@dataclass
class PodSource:
    deployment: dict[str, Any]
    config_text: str
    docs: list[dict[str, Any]]
    rendered: bool

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.deployment["spec"]["template"]["spec"]
        return spec

    @property
    def config(self) -> Config:
        return _config(self.config_text)


def _pod_source() -> PodSource:
    """The example overlay as `kubectl kustomize` renders it; without kubectl, the base
    Deployment with the overlay's config.yaml (the files the render would combine)."""
    docs = _rendered(OVERLAY)
    if docs is not None:
        deployment = _one(docs, "Deployment", "mcp-quota-proxy")
        (volume,) = [
            v for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v
        ]
        configmap = _one(docs, "ConfigMap", volume["configMap"]["name"])
        return PodSource(deployment, configmap["data"]["config.yaml"], docs, rendered=True)
    docs = [
        *_docs(K8S / "base" / "deployment.yaml"),
        *_docs(K8S / "base" / "service.yaml"),
        *_docs(K8S / "base" / "pdb.yaml"),
        *_docs(K8S / OVERLAY / "ingress.yaml"),
        *_docs(K8S / "monitoring" / "servicemonitor.yaml"),
    ]
    text = (K8S / OVERLAY / "config.yaml").read_text()
    return PodSource(_one(docs, "Deployment"), text, docs, rendered=False)


def _workloads() -> list[tuple[str, dict[str, Any], Config]]:
    """(label, pod spec, the config its ConfigMap holds) for every pod definition."""
    base_config = _config((K8S / "base" / "config.yaml").read_text())
    source = _pod_source()
    return [
        ("base", _one(_docs(K8S / "base" / "deployment.yaml"), "Deployment"), base_config),
        (
            "statefulset",
            _one(_docs(K8S / "statefulset" / "statefulset.yaml"), "StatefulSet"),
            base_config,
        ),
        ("overlay", source.deployment, source.config),
    ]


def _port(container: dict[str, Any], name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name_or_number]
    return int(port)


def _mount_for(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    for mount in container.get("volumeMounts", []):
        if path == mount["mountPath"] or path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return dict(mount)
    return None


def _env_value(container: dict[str, Any], name: str) -> str | None:
    for var in container.get("env", []):
        if var["name"] == name:
            return str(var["value"]) if "value" in var else None
    return None


@pytest.mark.parametrize("label", ["base", "statefulset", "overlay"])
def test_pod_settings_are_coherent(label: str) -> None:
    (workload, config) = next((w, c) for lbl, w, c in _workloads() if lbl == label)
    pod = workload["spec"]["template"]["spec"]
    proxy, upstream = _container(pod, "proxy"), _container(pod, "upstream")
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # The shutdown budget: readiness delay + in-flight grace + the drainer child's final
    # attempt + the `drain --once` that replaces it when the child did not finish cleanly
    # (proxy/usage/runner.py, supervise): each of the last two gets up to CHILD_GRACE_S.
    needed = config.ops.readiness_delay_s + config.ops.shutdown_grace_s + 2 * CHILD_GRACE_S
    assert pod["terminationGracePeriodSeconds"] >= needed
    assert "lifecycle" not in proxy, "the proxy handles SIGTERM itself: no preStop"
    sleep = upstream["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    outlives = config.ops.readiness_delay_s + config.ops.shutdown_grace_s
    assert outlives <= int(sleep[1]) < pod["terminationGracePeriodSeconds"]

    # Security: non-root (the Dockerfile's uid), read-only root, nothing to escalate.
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == _dockerfile_uid()
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]
        tmpdir = _env_value(c, "TMPDIR")
        assert tmpdir and _mount_for(c, tmpdir), f"{c['name']}: TMPDIR is not on a volume"

    # Probes on the proxy's listening port.
    listen = _port(proxy, "http")
    assert config.listen.port == listen and config.listen.host == "0.0.0.0"
    assert proxy["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert _port(proxy, proxy[probe]["httpGet"]["port"]) == listen
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == listen
    assert annotations["prometheus.io/path"] == "/metrics"

    # The proxy reaches the MCP server on the pod's localhost, on the port it listens on.
    args = upstream["args"]
    upstream_port = int(args[args.index("--port") + 1])
    assert config.upstream.url == f"http://127.0.0.1:{upstream_port}"
    assert _port(upstream, "upstream") == upstream_port

    # Config and spool on volumes; the spool is the pod's (emptyDir) or its own PVC.
    mqp_config = _env_value(proxy, "MQP_CONFIG")
    assert mqp_config and _mount_for(proxy, mqp_config)
    spool = _mount_for(proxy, config.spool.path)
    assert spool is not None and spool.get("readOnly") is not True, config.spool.path
    volumes = {v["name"]: v for v in pod["volumes"]}
    if workload["kind"] == "StatefulSet":
        assert spool["name"] not in volumes
        claims = [t["metadata"]["name"] for t in workload["spec"]["volumeClaimTemplates"]]
        assert spool["name"] in claims
    else:
        assert "emptyDir" in volumes[spool["name"]]
    refs = [e["valueFrom"]["secretKeyRef"] for e in proxy["env"] if "valueFrom" in e]
    assert {r["key"] for r in refs} == {
        "REDIS_URL",
        "MQP_KEY_PEPPER",
        "STRIPE_SECRET_KEY",
        "STRIPE_WEBHOOK_SECRET",
    }


def test_statefulset_runs_the_same_pod_as_the_deployment() -> None:
    deployment = _one(_docs(K8S / "base" / "deployment.yaml"), "Deployment")
    statefulset = _one(_docs(K8S / "statefulset" / "statefulset.yaml"), "StatefulSet")
    a, b = deployment["spec"]["template"], statefulset["spec"]["template"]
    a["spec"]["volumes"] = [v for v in a["spec"]["volumes"] if v["name"] != "spool"]
    assert a == b, "edit deploy/kubernetes/statefulset/statefulset.yaml with the Deployment"


def test_service_pdb_ingress_and_servicemonitor_point_at_the_proxy() -> None:
    source = _pod_source()
    docs, pod, config = source.docs, source.pod, source.config
    labels = source.deployment["spec"]["template"]["metadata"]["labels"]
    proxy = _container(pod, "proxy")
    service = _one(docs, "Service", "mcp-quota-proxy")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]  # only the proxy: the MCP server is not exposed
    assert port["name"] == "http" and _port(proxy, port["targetPort"]) == config.listen.port
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()

    ingress = _one(docs, "Ingress")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert [p["path"] for p in paths] == [config.billing.webhook_path]
    for p in paths:
        assert p["backend"]["service"] == {"name": "mcp-quota-proxy", "port": {"name": "http"}}
    text = (K8S / OVERLAY / "ingress.yaml").read_text()
    commented = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert any(f"path: {config.upstream.mcp_paths[0]}" in line for line in commented)


def test_servicemonitor_scrapes_the_proxy_port() -> None:
    (monitor,) = _docs(K8S / "monitoring" / "servicemonitor.yaml")
    service = _one(_docs(K8S / "base" / "service.yaml"), "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in names and endpoint["path"] == "/metrics"


# --------------------------------------------------------------------------- DEPLOY.md


def _shell_commands() -> list[str]:
    """Every command in DEPLOY.md's ```sh blocks, continuation lines joined."""
    text = DEPLOY_MD.read_text()
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        current = ""
        for line in block.splitlines():
            stripped = line.strip()
            if stripped.endswith("\\"):
                current += stripped[:-1] + " "
                continue
            current += stripped
            if current.strip():
                commands.append(current.strip())
            current = ""
    return commands


def _exec_commands() -> dict[str, list[str]]:
    """`kubectl exec ... -- mcp-quota-proxy VERB ...` commands by verb (the part after --)."""
    found: dict[str, list[str]] = {}
    for command in _shell_commands():
        argv = shlex.split(command, comments=True)
        if argv[:1] == ["kubectl"] and "exec" in argv and "--" in argv:
            inner = argv[argv.index("--") + 1 :]
            if inner[:1] == ["mcp-quota-proxy"] and inner[1] in ("billing", "tenant", "key"):
                found.setdefault(" ".join(inner[1:3]), argv)
    return found


def _exec_argv(verb: str) -> list[str]:
    """The command DEPLOY.md runs in the proxy container for ``verb`` (after `--`)."""
    argv = _exec_commands()[verb]
    return argv[argv.index("--") + 1 :]


def test_deploy_md_commands_match_the_manifests() -> None:
    source = _pod_source()
    commands = _shell_commands()
    namespace = yaml.safe_load((K8S / OVERLAY / "kustomization.yaml").read_text())["namespace"]
    assert f"kubectl apply -k deploy/kubernetes/{OVERLAY}" in commands

    (create,) = [shlex.split(c, comments=True) for c in commands if "create secret generic" in c]
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for e in _container(source.pod, "proxy")["env"]
        if "valueFrom" in e
    ]
    assert {r["name"] for r in refs} == {create[create.index("generic") + 1]}
    literals = {a.split("=", 2)[1] for a in create if a.startswith("--from-literal=")}
    assert literals == {r["key"] for r in refs}
    assert create[create.index("-n") + 1] == namespace

    execs = _exec_commands()
    assert set(execs) == {"billing setup", "tenant create", "key issue"}
    for argv in execs.values():
        assert argv[argv.index("-n") + 1] == namespace
        assert argv[argv.index("-c") + 1] == "proxy"
        assert "deploy/" + source.deployment["metadata"]["name"] in argv

    text = DEPLOY_MD.read_text()
    events = {*SUBSCRIPTION_EVENTS, "invoice.paid", "invoice.payment_succeeded"}
    events |= {"invoice.payment_failed", "checkout.session.completed"}
    for event in sorted(events):
        assert f"`{event}`" in text and f"enabled_events[]={event}" in text, event
    assert "/stripe/webhook" in text and "deploy/grafana/mcp-quota-proxy.json" in text


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]]


def _dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """(ARGs before the first FROM, stages) of the Dockerfile: comments dropped,
    continuation lines joined."""
    lines: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        lines.append(current + line)
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        op, _, value = line.partition(" ")
        op, value = op.upper(), value.strip()
        if op == "FROM":
            parts = value.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, parts[0], []))
        elif stages:
            stages[-1].instructions.append((op, value))
        elif op == "ARG":
            key, _, default = value.partition("=")
            args[key] = default
    return args, stages


def _stage_chain(name: str) -> list[tuple[str, str]]:
    """A stage's instructions, those of the stages it is built FROM first."""
    _, stages = _dockerfile()
    by_name = {s.name: s for s in stages}
    stage = by_name[name]
    inherited = _stage_chain(stage.base) if stage.base in by_name else []
    return inherited + stage.instructions


def _last(instructions: list[tuple[str, str]], op: str) -> str:
    values = [v for o, v in instructions if o == op]
    assert values, f"no {op}"
    return values[-1]


def _image_env(stage: str) -> dict[str, str]:
    env = dict(BASE_IMAGE_ENV)
    for op, value in _stage_chain(stage):
        if op == "ENV":
            for pair in shlex.split(value):
                key, _, val = pair.partition("=")
                env[key] = val.replace("$PATH", env["PATH"])
    return env


def _dockerfile_uid() -> int:
    user = _last(_stage_chain("runtime"), "USER")
    assert re.fullmatch(r"\d+(:\d+)?", user), f"USER {user}: numeric, for runAsNonRoot"
    return int(user.split(":")[0])


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), value
    return parsed


def test_dockerfile_runtime_stage() -> None:
    args, stages = _dockerfile()
    assert args["PYTHON_IMAGE"] == "python:3.12-slim"
    assert stages[-1].name == "runtime", "the proxy must be the default (last) target"
    runtime = _stage_chain("runtime")
    assert _dockerfile_uid() == 10001
    assert _exec_form(_last(runtime, "ENTRYPOINT")) == ["mcp-quota-proxy"]
    assert _exec_form(_last(runtime, "CMD")) == ["serve"]
    assert "8080" in _last(runtime, "EXPOSE").split()
    healthcheck = _last(runtime, "HEALTHCHECK")
    timeout = re.search(r"--timeout=(\d+)s", healthcheck)
    assert timeout and int(timeout.group(1)) <= 5, healthcheck
    probe = _exec_form(healthcheck.split(" CMD ", 1)[1])
    assert probe[0] == "python" and "/healthz" in probe[-1] and "curl" not in healthcheck
    env = _image_env("runtime")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["MQP_CONFIG"] == "/etc/mcp-quota-proxy/config.yaml"
    assert env["TMPDIR"] == "/tmp"
    assert env["PATH"].startswith(f"{VENV_IN_IMAGE}/bin:")
    # Nothing is installed or compiled in the runtime stages: they only copy the venv.
    for op, value in runtime:
        assert op != "RUN" or ("pip" not in value and "apt-get" not in value), value
    copies = [v for o, v in runtime if o == "COPY"]
    assert f"--from=build {VENV_IN_IMAGE} {VENV_IN_IMAGE}" in copies
    assert any(c.endswith(" " + env["MQP_CONFIG"]) for c in copies)
    upstream = _stage_chain("demo-upstream")
    assert _exec_form(_last(upstream, "ENTRYPOINT"))[:3] == ["python", "-m", "proxy.demo.upstream"]


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a match on a parent excludes it."""
    excluded = False
    parts = path.split("/")
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        regex = _ignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def _copy_sources() -> list[str]:
    _, stages = _dockerfile()
    sources: list[str] = []
    for stage in stages:
        for op, value in stage.instructions:
            if op == "COPY" and not value.startswith("--from"):
                sources += shlex.split(value)[:-1]
    return sources


def test_dockerignore_keeps_what_the_dockerfile_copies_and_drops_local_state() -> None:
    for source in _copy_sources():
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert not _dockerignored(rel), f".dockerignore drops {rel}, which COPY needs"
    for local in (
        ".git/HEAD",
        ".venv/bin/python",
        ".pytest_cache/v",
        ".hypothesis/x",
        "spool/usage.db",
        "usage.db-wal",
        "proxy/__pycache__/x.pyc",
        "node_modules/x/package.json",
        ".ci/node/node_modules/x",
    ):
        assert _dockerignored(local), local


# --------------------------------------------------------------------------- (c) install


def _map_paths(command: str, mapping: dict[str, Path]) -> str:
    for image_path in sorted(mapping, key=len, reverse=True):
        command = command.replace(image_path, str(mapping[image_path]))
    return command


def _secret_placeholders() -> dict[str, str]:
    (secret,) = _docs(K8S / "base" / "secret.example.yaml")
    return {k: str(v) for k, v in secret["stringData"].items()}


def _container_env(
    container: dict[str, Any], secrets: dict[str, str], image_env: dict[str, str]
) -> dict[str, str]:
    """What Kubernetes gives the container: the image's ENV, then the container's env with
    secretKeyRef values taken from ``secrets`` (absent optional keys are left out)."""
    env = dict(image_env)
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        if ref["key"] in secrets:
            env[var["name"]] = secrets[ref["key"]]
        else:
            assert ref.get("optional"), f"{var['name']}: required key {ref['key']} missing"
    return env


def _venv_env(venv_bin: Path, env: dict[str, str]) -> dict[str, str]:
    """The image's PATH with the image's venv mapped to ``venv_bin``."""
    parts = env["PATH"].split(":")
    host = [str(venv_bin) if p == f"{VENV_IN_IMAGE}/bin" else p for p in parts]
    return {**env, "PATH": ":".join([*host, os.environ.get("PATH", "")])}


def _run_build_stage(tmp_path: Path) -> tuple[Path, Path]:
    """The Dockerfile's `build` stage, outside Docker: its COPY lines fill a scratch build
    context (nothing else of the repository), its ENV lines are set, and its RUN lines run
    verbatim with the image's paths mapped to directories under ``tmp_path``. Returns the
    virtualenv (the image's /opt/mcp-quota-proxy) and the wheel directory."""
    instructions = _stage_chain("build")
    ctx, wheels, venv = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    workdir = _last(instructions, "WORKDIR")
    mapping = {workdir: ctx, "/wheels": wheels, VENV_IN_IMAGE: venv}
    ctx.mkdir()
    for op, value in instructions:
        if op != "COPY":
            continue
        *sources, dest = shlex.split(value)
        target = Path(_map_paths(str(Path(workdir) / dest), mapping))
        for src in sources:
            path = ROOT / src
            if path.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(path, target, dirs_exist_ok=True, ignore=ignore)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name if dest.endswith("/") else target)
    # `python` is the base image's interpreter; here, the one running the tests.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (shim / "python").chmod(0o755)
    env = {**os.environ, **_image_env("build")}
    env["PATH"] = f"{shim}:{os.environ['PATH']}"
    env.pop("PYTHONPATH", None)
    for op, value in instructions:
        if op == "RUN":
            command = _map_paths(value, mapping)
            result = subprocess.run(
                ["/bin/sh", "-c", command],
                cwd=ctx,
                env=env,
                capture_output=True,
                text=True,
                timeout=800,
                check=False,
            )
            assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"
    return venv, wheels


@pytest.mark.timeout(900)  # slow-ish: builds a wheel and installs from PyPI
def test_dockerfile_install_steps_build_an_image_env_that_accepts_the_config(
    tmp_path: Path,
) -> None:
    venv, wheels = _run_build_stage(tmp_path)

    # Runtime dependencies only: no extras, no test tools, and the package from the wheel.
    probe = (
        "import importlib.util as u, json, proxy; print(json.dumps({'proxy': proxy.__file__, "
        "'extras': [m for m in ('mcp', 'pytest', 'hypothesis', 'mypy', 'ruff', "
        "'kubernetes_validate') if u.find_spec(m)]}))"
    )
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(found.stdout)
    assert report["extras"] == [] and report["proxy"].startswith(str(venv)), report

    # check-config, as the image's entrypoint, with the environment the Deployment sets.
    source = _pod_source()
    proxy = _container(source.pod, "proxy")
    image_env = _venv_env(venv / "bin", _image_env("runtime"))
    run_env = _container_env(proxy, _secret_placeholders(), image_env)
    configs = {
        "ConfigMap (rendered)" if source.rendered else "overlay config.yaml": source.config_text,
        "base config.yaml (also the image's default)": (K8S / "base" / "config.yaml").read_text(),
    }
    entrypoint = _exec_form(_last(_stage_chain("runtime"), "ENTRYPOINT"))
    for label, text in configs.items():
        path = tmp_path / "config.yaml"
        path.write_text(text)
        argv = [str(venv / "bin" / entrypoint[0]), *entrypoint[1:], "check-config"]
        result = subprocess.run(
            [*argv, "--config", str(path)],
            cwd=tmp_path,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"{label}: {result.stderr}"
        assert "listen   0.0.0.0:8080" in result.stdout, result.stdout

    # The image's interpreter is the base image's (3.12), and its CPU may be arm64: every
    # dependency, the demo extra's included, must exist as a wheel for it.
    version = _dockerfile()[0]["PYTHON_IMAGE"].split(":")[1].split("-")[0]
    (wheel,) = wheels.glob("mcp_quota_proxy-*.whl")
    for arch in ("x86_64", "aarch64"):
        platforms = [f"--platform=manylinux_2_{n}_{arch}" for n in (17, 28, 31, 34, 36)]
        result = subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--only-binary=:all:",
                f"--python-version={version}",
                "--implementation=cp",
                *platforms,
                "--target",
                str(tmp_path / f"target-{arch}"),
                f"{wheel}[demo]",
            ],
            env={**os.environ, **_image_env("build"), "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, f"{arch}: {result.stderr[-3000:]}"


# --------------------------------------------------------------------------- (d) the pod


@dataclass
class PodProcess:
    name: str
    proc: asyncio.subprocess.Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@dataclass
class SimulatedPod:
    """The pod's containers as local processes: volumes are directories under ``root``,
    a mount path in a value is rewritten to its directory."""

    root: Path
    source: PodSource
    ports: dict[int, int]  # containerPort -> the port used here (the same unless taken)
    volumes: dict[str, Path] = field(default_factory=dict)
    proxy_extra_env: dict[str, str] = field(default_factory=dict)  # not from the manifests

    def volume(self, name: str) -> Path:
        path = self.volumes.setdefault(name, self.root / "volumes" / name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def host_path(self, container: dict[str, Any], path: str) -> str:
        mount = _mount_for(container, path)
        if mount is None:
            return path
        rest = path[len(mount["mountPath"].rstrip("/")) :]
        return f"{self.volume(mount['name'])}{rest}"

    def argv(self, container: dict[str, Any], stage: str) -> list[str]:
        """command/args, or the image's ENTRYPOINT/CMD, as Kubernetes combines them."""
        chain = _stage_chain(stage)
        if "command" in container:
            argv = [*container["command"], *container.get("args", [])]
        else:
            entry = _exec_form(_last(chain, "ENTRYPOINT"))
            argv = [*entry, *container.get("args", _exec_form(_last(chain, "CMD")))]
        return [str(self.ports.get(int(a), a)) if a.isdigit() else a for a in argv]

    def env(self, container: dict[str, Any], stage: str, secrets: dict[str, str]) -> dict[str, str]:
        image_env = _venv_env(Path(sys.executable).parent, _image_env(stage))
        env = _container_env(container, secrets, image_env)
        env = {
            k: self.host_path(container, v) if v.startswith("/") and k != "PATH" else v
            for k, v in env.items()
        }
        return {**env, **self.proxy_extra_env} if container["name"] == "proxy" else env

    def workdir(self, container: dict[str, Any], stage: str) -> Path:
        mapped = Path(self.host_path(container, _last(_stage_chain(stage), "WORKDIR")))
        if not mapped.is_relative_to(self.root):
            mapped = self.root / "rootfs" / container["name"]  # not a volume: read-only there
        mapped.mkdir(parents=True, exist_ok=True)
        return mapped


STAGES = {"proxy": "runtime", "upstream": "demo-upstream"}


def _port_or_free(port: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


async def _start(pod: SimulatedPod, name: str, secrets: dict[str, str]) -> PodProcess:
    container = _container(pod.source.pod, name)
    stage = STAGES[name]
    env = pod.env(container, stage, secrets)
    argv = pod.argv(container, stage)
    binary = shutil.which(argv[0], path=env["PATH"])
    assert binary, f"{argv[0]} is not on the container's PATH {env['PATH']}"
    log = pod.root / f"{name}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            binary,
            *argv[1:],
            cwd=pod.workdir(container, stage),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # its own process group: the drainer child goes with it
        )
    return PodProcess(name, proc, log)


def _kill_group(p: PodProcess) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.proc.pid, signal.SIGKILL)


async def _until_status(
    http: aiohttp.ClientSession, url: str, status: int, limit: float, proc: PodProcess
) -> None:
    deadline = time.monotonic() + limit
    last = "no answer"
    while True:
        assert proc.proc.returncode is None, f"{proc.name} exited: {proc.output()}"
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
                if r.status == status:
                    return
                last = f"{r.status} {await r.text()}"
        assert time.monotonic() < deadline, f"{url}: not {status} in {limit} s ({last})"
        await asyncio.sleep(0.1)


async def _cli(pod: SimulatedPod, argv: list[str], secrets: dict[str, str]) -> str:
    """An admin command as `kubectl exec ... -c proxy -- <argv>` runs it: the proxy
    container's environment, working directory and configuration."""
    container = _container(pod.source.pod, "proxy")
    env = pod.env(container, "runtime", secrets)
    binary = shutil.which(argv[0], path=env["PATH"])
    assert binary, argv
    proc = await asyncio.create_subprocess_exec(
        binary,
        *argv[1:],
        cwd=pod.workdir(container, "runtime"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"{shlex.join(argv)}: {err.decode()}"
    return out.decode()


@contextlib.asynccontextmanager
async def _running(processes: list[PodProcess]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for p in processes:
            _kill_group(p)
        for p in processes:
            await p.proc.wait()


@pytest.fixture
def simulated_pod(tmp_path: Path, redis_url: str, key_prefix: str) -> Iterator[SimulatedPod]:
    source = _pod_source()
    proxy = _container(source.pod, "proxy")
    upstream = _container(source.pod, "upstream")
    # The manifest's own ports, unless something on this machine holds them already.
    ports = {p: _port_or_free(p) for p in (_port(proxy, "http"), _port(upstream, "upstream"))}
    pod = SimulatedPod(tmp_path, source, ports)
    # The ConfigMap, mounted where the pod mounts it, with the test's changes only: listen
    # on 127.0.0.1 (not every interface of this machine), this test's key prefix in the
    # shared Redis, the spool in the simulated volume, and ports only if the manifest's
    # are taken on this machine.
    data = yaml.safe_load(source.config_text)
    data["listen"]["host"] = "127.0.0.1"
    data["listen"]["port"] = ports[data["listen"]["port"]]
    data["redis"]["key_prefix"] = key_prefix
    data["spool"]["path"] = pod.host_path(proxy, data["spool"]["path"])
    upstream_port = source.config.upstream.url.rsplit(":", 1)[1]
    data["upstream"]["url"] = f"http://127.0.0.1:{ports[int(upstream_port)]}"
    (volume,) = [v for v in source.pod["volumes"] if "configMap" in v]
    (mount,) = [m for m in proxy["volumeMounts"] if m["name"] == volume["name"]]
    assert mount.get("readOnly") is True and "subPath" not in mount
    (pod.volume(volume["name"]) / "config.yaml").write_text(yaml.safe_dump(data))
    yield pod


@pytest.mark.redis
@pytest.mark.timeout(240)
async def test_pod_simulation_serves_a_tool_call_and_stops_within_the_grace_period(
    simulated_pod: SimulatedPod, redis_url: str
) -> None:
    pod = simulated_pod
    config = pod.source.config
    proxy_spec = _container(pod.source.pod, "proxy")
    listen = pod.ports[_port(proxy_spec, "http")]
    base = f"http://127.0.0.1:{listen}"
    async with run_stripe_fake() as fake:
        customer = fake.add_customer(name="acme")["id"]
        secrets = {
            "REDIS_URL": redis_url,
            "MQP_KEY_PEPPER": PEPPER,
            "STRIPE_SECRET_KEY": STRIPE_TEST_KEY,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_TEST_SECRET,
        }
        # The one addition to the manifests' environment: the Stripe test double instead of
        # api.stripe.com.
        pod.proxy_extra_env["STRIPE_API_BASE"] = fake.url
        processes: list[PodProcess] = []
        async with _running(processes), aiohttp.ClientSession() as http:
            # Both containers start together, as in the pod; the proxy's probes say when.
            processes.append(await _start(pod, "upstream", secrets))
            processes.append(await _start(pod, "proxy", secrets))
            upstream, proxy = processes
            startup = proxy_spec["startupProbe"]
            budget = startup["periodSeconds"] * startup["failureThreshold"]
            await _until_status(http, base + startup["httpGet"]["path"], 200, budget, proxy)
            live = proxy_spec["livenessProbe"]["httpGet"]["path"]
            await _until_status(http, base + live, 200, 5, proxy)
            ready = proxy_spec["readinessProbe"]["httpGet"]["path"]
            await _until_status(http, base + ready, 200, 30, proxy)  # upstream reachable too

            # DEPLOY.md steps 4 and 6, as written there (the customer id is the double's).
            setup = await _cli(pod, _exec_argv("billing setup"), secrets)
            assert f"meter_event_name: {config.billing.meter_event_name}" in setup
            create = [re.sub(r"^cus_\w+$", customer, a) for a in _exec_argv("tenant create")]
            tenant = create[create.index("create") + 1]
            assert "created tenant" in await _cli(pod, create, secrets)
            key = (await _cli(pod, _exec_argv("key issue"), secrets)).splitlines()[0].strip()
            assert key.startswith(config.auth.key_prefix)

            # A tool call through the proxy, with the Host an Ingress would pass on.
            ingress = [d for d in pod.source.docs if d["kind"] == "Ingress"]
            host = ingress[0]["spec"]["rules"][0]["host"] if ingress else "mcp.example.com"
            url = base + config.upstream.mcp_paths[0]
            headers = {"Authorization": f"Bearer {key}", "Host": host}
            result = await call_tool(url, headers, "legacy", "add", {"a": 2, "b": 3})
            assert not result.is_error and result.text == "5", result.text
            async with http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}) as r:
                assert r.status == 401  # the proxy answers, not the MCP server

            # The drainer child sends the call's usage to Stripe (the double).
            meter = config.billing.meter_event_name
            deadline = time.monotonic() + 30 + config.drain.interval_s
            while fake.total(customer, meter) < 1:
                assert time.monotonic() < deadline, f"usage not drained: {proxy.output()}"
                assert proxy.proc.returncode is None, proxy.output()
                await asyncio.sleep(0.1)
            assert fake.total(customer, meter) == 1

            annotations = pod.source.deployment["spec"]["template"]["metadata"]["annotations"]
            metrics_port = pod.ports[int(annotations["prometheus.io/port"])]
            metrics_url = f"http://127.0.0.1:{metrics_port}{annotations['prometheus.io/path']}"
            async with http.get(metrics_url) as r:
                assert r.status == 200 and "mqp_" in await r.text()

            # SIGTERM, as the kubelet sends it to the container's first process: /readyz
            # turns 503 while /healthz still answers, then a clean exit within the grace
            # period that the Deployment gives the pod.
            grace = pod.source.pod["terminationGracePeriodSeconds"]
            stop_started = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)
            await _until_status(http, base + ready, 503, 3, proxy)
            async with http.get(base + live) as r:
                assert r.status == 200
            assert await asyncio.wait_for(proxy.proc.wait(), grace) == 0, proxy.output()
            assert time.monotonic() - stop_started < grace
            log = proxy.output()
            assert key not in log and STRIPE_TEST_KEY not in log and PEPPER not in log
            assert tenant in log  # the tool_call line names the tenant
            upstream.proc.send_signal(signal.SIGTERM)  # after its preStop, in the pod
            await asyncio.wait_for(upstream.proc.wait(), grace)

"""deploy/kubernetes, checked without a cluster: every resource against the Kubernetes API schemas
(kubernetes-validate ships them in its wheel; the test forbids the network), then the properties that
make it a service an operator can expose: probes, a hardened pod, and selectors that agree."""

import argparse
import re
import socket
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from api import serve
from api.app import create_app
from api.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
# The oldest release the manifests are for (image volumes are on by default from 1.35), and the newest schemas.
VERSIONS = ["1.35", kubernetes_validate.latest_version()]
UID = 10001  # docker/Dockerfile's USER


def resources() -> list[dict]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            found += [r for r in yaml.safe_load_all(path.read_text()) if r]
    return found


def the(kind: str) -> dict:
    (resource,) = [r for r in resources() if r["kind"] == kind]
    return resource


def quantity(text: str | int) -> float:
    """A Kubernetes quantity as a number: "1536Mi" -> bytes, "500m" -> cores."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * units.get(unit, 1)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the schemas must come from the installed package, not the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def pod() -> dict:
    return the("Deployment")["spec"]["template"]


@pytest.fixture
def container(pod) -> dict:
    (container,) = pod["spec"]["containers"]
    return container


@pytest.mark.parametrize("version", VERSIONS)
def test_every_resource_is_valid_against_the_kubernetes_schemas(version, no_network):
    kinds = []
    for resource in resources():
        # strict: a misspelt or misplaced field is an error, not silently ignored
        kubernetes_validate.validate(resource, version, strict=True)
        kinds.append(resource["kind"])
    assert sorted(kinds) == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]


def test_the_schema_check_catches_a_mistake(no_network):
    deployment = the("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_probes_ask_liveness_and_readiness_of_the_served_port(container):
    paths = set(create_app(Settings(checkpoint=ROOT / "unused")).openapi()["paths"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["path"] in paths
        assert probe["port"] in ports


def test_it_runs_captioner_serve_on_its_container_port_with_settings_that_exist(container):
    argv = container["args"]
    assert argv[:2] == ["captioner", "serve"] and "command" not in container
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    settings = serve.settings_from_args(parser.parse_args(argv[2:]))  # an unknown flag exits here
    assert settings.host == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [settings.port]
    for variable in container["env"]:
        name = variable["name"]
        assert name.startswith("CAPTIONER_") and name[len("CAPTIONER_") :].lower() in Settings.model_fields, name


def test_the_api_key_comes_from_a_secret(container):
    (key,) = [v for v in container["env"] if v["name"] == "CAPTIONER_API_KEY"]
    assert "value" not in key
    assert key["valueFrom"]["secretKeyRef"]["name"]
    assert not key["valueFrom"]["secretKeyRef"].get("optional", False), "without a key the pod must not start"


def test_termination_outlasts_the_prestop_pause_and_the_graceful_shutdown(pod, container):
    argv = container["args"]
    graceful = float(argv[argv.index("--timeout-graceful-shutdown") + 1])
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + graceful


def test_the_pod_runs_hardened(pod, container):
    pod_security = pod["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == UID != 0
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["spec"]["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert not security.get("privileged") and "add" not in security["capabilities"]


def test_the_model_is_mounted_read_only_where_the_checkpoint_points_and_only_tmp_is_writable(pod, container):
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    (checkpoint,) = [v["value"] for v in container["env"] if v["name"] == "CAPTIONER_CHECKPOINT"]
    model = mounts[str(Path(checkpoint).parent)]
    assert model["readOnly"] is True
    # docker/Dockerfile.model puts model.safetensors at the root of the image mounted here
    assert Path(checkpoint).name == "model.safetensors" and "image" in volumes[model["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    for path, mount in mounts.items():
        writable = not mount.get("readOnly", False)
        assert not writable or "emptyDir" in volumes[mount["name"]], f"{path} is writable and not scratch"


def test_resources_fit_the_model(container):
    """The limit holds the idle server and its two workers (2 CPUs: two workers), under 1 GB
    (benchmarks/RESULTS.md), plus what decoding may add at most: a worker decodes one image at
    a time, each within max_decode_bytes (512 MiB by default)."""
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert quantity(limits["cpu"]) == 2
    assert quantity(requests["memory"]) >= 2**30
    assert quantity(limits["memory"]) >= 2**30 + 2 * 512 * 2**20
    assert quantity(requests["memory"]) <= quantity(limits["memory"]) <= 3 * 2**30
    assert quantity(requests["cpu"]) > 0  # the autoscaler's utilisation is a share of the request
    assert quantity(limits["cpu"]) >= quantity(requests["cpu"])


def test_the_autoscaler_scales_the_deployment_on_cpu():
    deployment, hpa = the("Deployment"), the("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    # at least two pods, so that the disruption budget can evict one while the other serves
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"


def test_the_budget_and_the_service_select_the_pods(pod, container):
    deployment, pdb, service = the("Deployment"), the("PodDisruptionBudget"), the("Service")
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["maxUnavailable"] == 1
    assert service["spec"]["selector"].items() <= labels.items() and service["spec"]["selector"]
    port_names = {p["name"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names

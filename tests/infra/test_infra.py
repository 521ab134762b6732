"""The deployment files in infra/ parse and agree: one image, one command, one shape of cluster."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"
README = INFRA.parent / "README.md"


def load(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


@pytest.fixture(scope="module")
def files() -> dict:
    return {
        "raycluster": load("kuberay/raycluster.yaml"),
        "rayjob": load("kuberay/rayjob.yaml"),
        "launcher": load("ray-cluster.yaml"),
    }


def kuberay_groups(spec: dict) -> dict:
    """{group name: (rayStartParams, the container)} of a RayCluster spec."""
    groups = {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
    return {name: (group["rayStartParams"], group["template"]["spec"]["containers"][0]) for name, group in groups.items()}


def test_the_kinds_are_what_kuberay_and_the_launcher_read(files):
    assert (files["raycluster"]["apiVersion"], files["raycluster"]["kind"]) == ("ray.io/v1", "RayCluster")
    assert (files["rayjob"]["apiVersion"], files["rayjob"]["kind"]) == ("ray.io/v1", "RayJob")
    assert files["launcher"]["provider"]["type"] == "aws"
    assert files["launcher"]["head_node_type"] in files["launcher"]["available_node_types"]


def test_every_file_runs_the_same_image(files):
    images = {container["image"] for spec in (files["raycluster"]["spec"], files["rayjob"]["spec"]["rayClusterSpec"])
              for _, container in kuberay_groups(spec).values()}  # fmt: skip
    images.add(files["launcher"]["docker"]["image"])
    assert len(images) == 1, images


def test_the_job_runs_on_a_cluster_of_the_long_lived_clusters_shape(files):
    assert files["rayjob"]["spec"]["rayClusterSpec"] == files["raycluster"]["spec"]


def test_kubernetes_ray_and_the_launcher_agree_on_resources(files):
    groups = kuberay_groups(files["raycluster"]["spec"])
    head_params, _ = groups.pop("head")
    [(worker_params, worker)] = groups.values()
    requests, limits = worker["resources"]["requests"], worker["resources"]["limits"]
    assert requests == limits  # guaranteed pods: Ray's view of the node is what the pod gets
    launcher = files["launcher"]["available_node_types"]
    assert int(requests["cpu"]) == int(worker_params["num-cpus"]) == launcher["gpu_worker"]["resources"]["CPU"]
    assert int(requests["nvidia.com/gpu"]) == int(worker_params["num-gpus"]) == launcher["gpu_worker"]["resources"]["GPU"]
    assert int(head_params["num-cpus"]) == launcher["head"]["resources"]["CPU"] == 0


def test_one_encode_command_everywhere_and_it_is_a_valid_diffarc_command(files):
    from diffarc.jobs.cli import main

    entrypoint = files["rayjob"]["spec"]["entrypoint"]
    launcher_text = (INFRA / "ray-cluster.yaml").read_text()
    assert f'ray exec infra/ray-cluster.yaml "{entrypoint}"' in launcher_text
    assert entrypoint in (INFRA / "README.md").read_text()
    program, *args = shlex.split(entrypoint)
    assert program == "diffarc"
    command = main.get_command(None, args[0])
    assert command is not None, f"diffarc has no command {args[0]!r}"
    command.make_context(args[0], args[1:])  # click refuses unknown options and missing arguments


def test_the_image_installs_with_the_readmes_line_on_the_clusters_ray_version(files):
    dockerfile = (INFRA / "Dockerfile").read_text()
    install = re.search(r"^(pip install [^#\n]*?)\s+#", README.read_text(), re.M).group(1)
    assert re.search(rf"^RUN .*{re.escape(install)}$", dockerfile, re.M), install
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:([\d.]+)-py311-cpu$", dockerfile, re.M).group(1)
    assert base == files["raycluster"]["spec"]["rayVersion"] == files["rayjob"]["spec"]["rayClusterSpec"]["rayVersion"]
    assert f"rayproject/ray:{base}-py311-cu128" in dockerfile

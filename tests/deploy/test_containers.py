"""deploy/Dockerfile and deploy/nic.def agree with pyproject.toml: the Docker image installs the
package with extras pyproject.toml defines (the [gpu] one), and the Apptainer image is built from
that Docker image and labelled with the same extras. Neither can be built here (no Docker engine)."""

from __future__ import annotations

import re
import tomllib

from tests.deploy.conftest import REPO

DEPLOY = REPO / "deploy"


def _dockerfile() -> dict:
    """ARG defaults, the image tag of the build comment, the extras of the pip install line."""
    text = (DEPLOY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    install = re.search(r'pip install [^\n]*"/src/nic\[([^\]]+)\]"', text).group(1)
    extras = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], install)  # ${NIC_EXTRAS} -> its default
    return {"args": args, "tag": re.search(r"docker build -t (\S+)", text).group(1),
            "extras": set(extras.split(",")), "from": re.search(r"^FROM (\S+)", text, re.M)}


def _definition() -> dict:
    """Header keys and %labels of the Apptainer definition."""
    text = (DEPLOY / "nic.def").read_text()
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)$", text, flags=re.M))
    labels_block = re.search(r"^%labels\n((?:[ \t]+.*\n)+)", text, flags=re.M).group(1)
    labels = dict(line.split(None, 1) for line in labels_block.strip().splitlines())
    return {"header": header, "labels": labels}


def test_dockerfile_installs_extras_that_pyproject_defines():
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    docker = _dockerfile()
    assert docker["extras"] == {"gpu"} and docker["extras"] <= extras
    assert docker["args"]["CUDA_IMAGE"].startswith("nvidia/cuda:") and docker["from"].group(1) == "${CUDA_IMAGE}"


def test_apptainer_definition_is_built_from_the_docker_image_with_the_same_extras():
    docker, definition = _dockerfile(), _definition()
    assert definition["header"] == {"Bootstrap": "docker-daemon", "From": docker["tag"]}
    assert set(definition["labels"]["nic.extras"].split(",")) == docker["extras"]

"""The installed import names: every package folder is installed, and nothing in the working
directory can shadow them (a CLAM checkout has its own ``models/``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"nic_pipeline": "pipeline", "nic_models": "models"}


def test_the_package_list_names_every_package_folder():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == FOLDERS
    on_disk = set()
    for name, folder in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            on_disk.add(".".join([name, *init.parent.relative_to(REPO / folder).parts]))
    assert set(setuptools["packages"]) == on_disk


@pytest.mark.slow
def test_folders_named_pipeline_and_models_in_the_working_directory_shadow_nothing(tmp_path):
    for folder in ("pipeline", "models"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("raise ImportError('the wrong package was imported')\n")
        (tmp_path / folder / "registry.py").write_text("raise ImportError('the wrong package was imported')\n")
    code = "import nic_pipeline as nic; print(nic.create_encoder('nic').spec.name)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("nic-")

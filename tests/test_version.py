"""One version: services.__version__ is the project's, what pyproject.toml builds and what every
service reports (KServe ServerMetadata and the gateway's OpenAPI document are checked where they are
served: tests/inference/test_kserve.py, tests/gateway/test_gateway.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import fashion
import services

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_takes_its_version_from_services() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "services.__version__"}


def test_the_client_is_released_with_the_same_version() -> None:
    assert fashion.__version__ == services.__version__


def test_the_project_states_its_license_and_where_it_lives() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    license_ = project["license"]
    assert (license_ if isinstance(license_, str) else license_["text"]) == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert {"Homepage", "Documentation", "Issues"} <= set(project["urls"])

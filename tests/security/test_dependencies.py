"""Supply chain: litellm (which had compromised releases on PyPI) is pinned exactly, and the
installed version is the pinned one."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.reliability

COMPROMISED_LITELLM = {"1.82.7", "1.82.8"}


def _requirements() -> dict[str, str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for spec in project["dependencies"]:
        name = re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower()
        found[name] = spec
    return found


def test_litellm_is_pinned_exactly() -> None:
    spec = _requirements()["litellm"]
    match = re.fullmatch(r"litellm==(\d+(?:\.\d+)+)", spec.replace(" ", ""))
    assert match, f"litellm must be pinned with == to one version, got {spec!r}"
    assert match.group(1) not in COMPROMISED_LITELLM


def test_installed_litellm_is_the_pinned_one() -> None:
    pinned = _requirements()["litellm"].split("==", 1)[1].strip()
    try:
        installed = importlib.metadata.version("litellm")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("litellm is not installed here")
    assert installed == pinned

"""Package metadata a user's tooling reads (pip, license scanners)."""

import os

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_license_is_declared_and_shipped():
    project = _project()
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_core_dependency_is_a_range():
    # the package pins nothing of the user's stack: torch is a lower bound
    deps = _project()["dependencies"]
    assert "torch>=2.4" in deps
    assert not any("==" in d for d in deps), deps


def test_extras_users_name_exist_and_all_is_their_union():
    extras = _project()["optional-dependencies"]
    for name in ("triton", "deepspeed", "integrations", "all", "test", "lint"):
        assert name in extras, name
    users = set(extras["triton"]) | set(extras["deepspeed"]) | set(extras["integrations"])
    assert set(extras["all"]) == users


def test_the_sdist_manifest_takes_the_whole_repository():
    # make dist-check builds it and compares with git ls-files; this keeps
    # the manifest from losing a folder in between
    with open(os.path.join(ROOT, "MANIFEST.in")) as f:
        manifest = f.read()
    for folder in ("tests", "docs", "launch", "benchmarks", "tools", ".ci"):
        assert f"graft {folder}" in manifest, folder

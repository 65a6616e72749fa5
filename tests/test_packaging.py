"""The package looks like one: version, license metadata, type markers, a
documented public API, a configuration reference that covers every key,
and (slow: scripts/check_wheel.sh) a wheel that installs and trains."""
import os
import subprocess
import sys

import pytest

import braid_ext
import layerpar
from layerpar.config import DEFAULTS

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)["project"]


def test_version_and_license_metadata():
    meta = pyproject()
    assert meta["version"] == layerpar.__version__
    assert meta["license"] == "MIT" and meta["license-files"] == ["LICENSE"]  # SPDX
    with open(os.path.join(ROOT, "LICENSE")) as fh:
        assert fh.readline().strip() == "MIT License"
    assert "License ::" not in " ".join(meta["classifiers"])  # the SPDX expression says it
    assert {"Homepage", "Documentation", "Source", "Changelog"} <= set(meta["urls"])
    assert os.path.exists(os.path.join(ROOT, "CHANGELOG.md"))
    for package in (layerpar, braid_ext):
        assert os.path.exists(os.path.join(os.path.dirname(package.__file__), "py.typed"))


@pytest.mark.parametrize("package", [layerpar, braid_ext], ids=lambda p: p.__name__)
def test_every_public_name_is_documented(package):
    """Every name of __all__ has a docstring (the API reference is
    generated from them), and so has every public method of its classes
    that is not an override of a base class's (``forward`` of a module)."""
    bare = []
    for name in package.__all__:
        obj = getattr(package, name)
        if not (getattr(obj, "__doc__", None) or "").strip():
            bare.append(name)
        if isinstance(obj, type) and obj.__module__.startswith(package.__name__):
            for attr, value in vars(obj).items():
                inherited = any(hasattr(base, attr) for base in obj.__mro__[1:])
                if attr.startswith("_") or not callable(value) or inherited:
                    continue
                if not (getattr(value, "__doc__", None) or "").strip():
                    bare.append(f"{name}.{attr}")
    assert bare == []


def test_configuration_reference_covers_every_key():
    sys.path.insert(0, os.path.join(ROOT, "docs", "_ext"))
    try:
        import configref
    finally:
        sys.path.pop(0)
    rows = {s: [k for k, _, _ in keys] for s, keys in configref.rows()}
    assert rows == {s: list(v) for s, v in DEFAULTS.items()}
    described = {(s, k) for s, keys in configref.rows() for k, _, text in keys if text}
    # a comment beside (nearly) every key; the few without one are named here
    assert len(described) >= sum(map(len, DEFAULTS.values())) - 2


@pytest.mark.e2e
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("LAYERPAR_CHECK_WHEEL") != "1",
                    reason="minutes long (compiles the core): LAYERPAR_CHECK_WHEEL=1 runs it")
def test_wheel_installs_and_trains():
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "check_wheel.sh")],
                       capture_output=True, text=True, timeout=1700)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"layerpar {layerpar.__version__}" in r.stdout.splitlines(), r.stdout
    assert r.stdout.strip().endswith("check_wheel: ok"), r.stdout

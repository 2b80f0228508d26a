"""What pyproject.toml declares is what the environment holds: every distribution of the dependencies and of the test
extra is installed at a version its specifier allows and its import name imports (a declared dependency that is
missing is a failure here, never a skip elsewhere), and importing our packages does not drag in torchvision."""
from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # declared for Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# distribution name (canonical) -> the module it is imported as. A dependency added to pyproject without a line here
# fails test_every_declared_distribution_has_an_import_name.
IMPORT_NAMES = {
    "torch": "torch",
    "torchattacks": "torchattacks",
    "pyautoattack": "pyautoattack",
    "numpy": "numpy",
    "rich": "rich",
    "tabulate": "tabulate",
    "mlxtend": "mlxtend",
    "matplotlib": "matplotlib",
    "scikit-learn": "sklearn",
    "tomli": "tomli",
    "pytest": "pytest",
    "pytest-xdist": "xdist",
    "scipy": "scipy",
    "pillow": "PIL",
    "packaging": "packaging",
    "ray": "ray",
    "submitit": "submitit",
}


@functools.cache
def import_owners() -> dict[str, list[str]]:
    return md.packages_distributions()


def declared() -> list[tuple[str, Requirement]]:
    reqs = [("dependencies", Requirement(r)) for r in PROJECT["dependencies"]]
    reqs += [("test extra", Requirement(r)) for r in PROJECT["optional-dependencies"]["test"]]
    return reqs


def applicable() -> list[tuple[str, Requirement]]:
    """The requirements whose environment marker holds here (tomli only below Python 3.11)."""
    return [(where, r) for where, r in declared() if r.marker is None or r.marker.evaluate()]


def test_pyproject_declares_the_libraries_the_code_imports():
    names = {canonicalize_name(r.name) for _, r in declared()}
    # the ones the product and its tests import directly; a reviewer who drops one from pyproject hears about it here
    assert {"torch", "torchattacks", "pyautoattack", "numpy", "rich", "tabulate", "mlxtend", "matplotlib",
            "scikit-learn", "pytest", "scipy", "pillow", "packaging"} <= names
    assert "torchvision" not in names  # only a dependency of torchattacks; nothing of ours imports it


def test_every_declared_distribution_has_an_import_name():
    missing = sorted({canonicalize_name(r.name) for _, r in declared()} - set(IMPORT_NAMES))
    assert not missing, f"add the import name of {missing} to IMPORT_NAMES"


@pytest.mark.parametrize("where,req", applicable(), ids=lambda v: str(v) if isinstance(v, Requirement) else v)
def test_declared_distribution_is_installed_and_imports(where, req):
    name = canonicalize_name(req.name)
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        pytest.fail(f"{req} (pyproject {where}) is not installed: run `make test` (it installs .[test]) "
                    f"or `.venv/bin/pip install -e '.[test]'`")
    assert req.specifier.contains(version, prereleases=True), f"{name} {version} does not satisfy {req} ({where})"
    module = importlib.import_module(IMPORT_NAMES[name])
    # the import name really belongs to that distribution (not a same-named module from somewhere else)
    owners = {canonicalize_name(d) for d in import_owners().get(IMPORT_NAMES[name].split(".")[0], [])}
    assert name in owners, (name, IMPORT_NAMES[name], owners, getattr(module, "__file__", None))


def test_our_packages_do_not_import_torchvision(tmp_path):
    """torchattacks depends on torchvision, but nothing of ours may import it (slow, and its own CUDA/ABI coupling
    to torch): not the six packages, not any of their modules."""
    code = (
        "import importlib, pkgutil, sys\n"
        "import bench\n"
        "from lawbench import attacks, models, datasets, certify, reports\n"
        "assert 'torchvision' not in sys.modules, 'the packages import torchvision'\n"
        "for pkg in (bench, attacks, models, datasets, certify, reports):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if info.name != 'bench.__main__':\n"
        "            importlib.import_module(info.name)\n"
        "        assert 'torchvision' not in sys.modules, 'importing ' + info.name + ' imports torchvision'\n"
        "print('checked', len(sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("checked")

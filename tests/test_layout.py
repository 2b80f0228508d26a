"""What gets installed and who imports whom: two import names (`bench`, `lawbench`), the design's layering rule read
from the modules' own imports, and a run from a directory full of look-alike folders beside a hostile `datasets`."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, SUBPROCESS_ENV, bench_cli

LIBS = ("base", "attacks", "models", "datasets", "certify", "reports")
# the design's layering rule: what each library may import of the project (besides itself); base, the bottom layer
# (one helper per idea), imports nothing of the project and every library may import it
ALLOWED = {
    "base": set(),
    "attacks": {"lawbench.base"},
    "models": {"lawbench.base"},
    "datasets": {"lawbench.base"},
    "certify": {"lawbench.models", "lawbench.base"},
    "reports": {"lawbench.base"},
}
# the modules of base that reports uses: they must not import torch (reports never does)
TORCH_FREE_BASE = ("files", "names", "modes", "timing")


def _project_imports(folder: Path, package: str) -> dict[str, set[str]]:
    """For each module file: the project packages it imports (lawbench.X or bench), relative imports resolved."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: stays inside the package unless it climbs above it
                    depth = len(path.relative_to(folder).parts) - 1
                    assert node.level <= depth + 1, f"{path}: relative import climbs out of {package}"
                    continue
                mods = [node.module or ""]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top in LIBS:
                    names.add(f"bare {top}")  # never: the bare name may be someone else's package
                elif top == "bench":
                    names.add("bench")
                elif top == "lawbench":
                    names.add(".".join(m.split(".")[:2]))
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("lib", LIBS)
def test_layering_rule_from_the_modules_imports(lib):
    own = f"lawbench.{lib}"
    for module, names in _project_imports(ROOT / lib, own).items():
        wrong = names - {own} - ALLOWED[lib]
        assert not wrong, f"{module} imports {sorted(wrong)}"


def test_bench_imports_the_libraries_only_through_the_namespace():
    for module, names in _project_imports(ROOT / "bench", "bench").items():
        assert not {n for n in names if n.startswith("bare ")}, f"{module} imports {sorted(names)}"


def _run_python(code: str, cwd: Path, env: dict | None = None):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **SUBPROCESS_ENV, **(env or {})})


BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
    sys.meta_path.insert(0, _NoTorch())
""")


def test_reports_imports_without_torch_or_bench(tmp_path):
    code = BLOCK_TORCH + textwrap.dedent("""
        import lawbench.reports, pkgutil, importlib
        for info in pkgutil.walk_packages(lawbench.reports.__path__, "lawbench.reports."):
            importlib.import_module(info.name)
        for name in %r:
            importlib.import_module("lawbench.base." + name)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "bench"))
        assert not bad, bad
        print("ok")
    """) % (TORCH_FREE_BASE,)
    res = _run_python(code, tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.parametrize("lib", ["attacks", "models", "datasets"])
def test_each_library_loads_alone(lib, tmp_path):
    """Importing one library (every module of it) loads no other part of the project."""
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        import lawbench.{lib} as pkg
        for info in pkgutil.walk_packages(pkg.__path__, "lawbench.{lib}."):
            importlib.import_module(info.name)
        mine = sorted({{".".join(m.split(".")[:2]) for m in sys.modules if m.split(".")[0] in ("lawbench", "bench")}})
        print(" ".join(mine))
    """)
    res = _run_python(code, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert set(res.stdout.split()) - {"lawbench.base"} == {"lawbench", f"lawbench.{lib}"}


def test_wheel_installs_only_bench_and_lawbench(tmp_path):
    """The wheel built from the project's files: top_level.txt names bench and lawbench, nothing else, and every
    library lies under lawbench/."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:  # a copy, so the build leaves nothing in the checkout
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".",
                          "-w", str(tmp_path / "dist")], cwd=src, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("lawbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    (top,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert sorted(zipfile.ZipFile(wheel).read(top).decode().split()) == ["bench", "lawbench"]
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"bench", "lawbench"}
    for lib in LIBS:
        assert f"lawbench/{lib}/__init__.py" in names, lib
    assert "lawbench/__init__.py" not in names  # a namespace package: another lawbench-* distribution may add to it
    assert "bench/presets/default.toml" in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "bench = bench.cli:main" in entry and "lawbench = bench.cli:main" in entry


@pytest.fixture
def hostile_dir(tmp_path):
    """A research checkout's folder: models/, datasets/, reports/, attacks/, certify/ packages whose import raises,
    and, first on sys.path, a package named datasets (as Hugging Face's would be) whose __init__ raises."""
    work = tmp_path / "checkout"
    for name in LIBS:
        (work / name).mkdir(parents=True)
        (work / name / "__init__.py").write_text(f"raise ImportError('the folder {name}/ of the current directory')\n")
    shadow = tmp_path / "site"
    (shadow / "datasets").mkdir(parents=True)
    (shadow / "datasets" / "__init__.py").write_text("raise RuntimeError('another package named datasets')\n")
    return work, {"PYTHONPATH": str(shadow)}


def test_list_and_run_beside_lookalike_folders_and_a_foreign_datasets(hostile_dir):
    work, env = hostile_dir
    res = bench_cli("list", cwd=work, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "mlp" in res.stdout and "mnist5k" in res.stdout and "pgd" in res.stdout
    res = bench_cli("run", "n_train=100", "n_test=20", "width=[8]", "epochs=3", "pgd_steps=5", "eps_Linf=[0.1]",
                    "aa_eps_Linf=[0.1]", "autoattack=[apgd-ce]", "lip_points=16", "recipe=erm",
                    "executor.name=local", "--out", "out",
                    cwd=work, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = [json.loads(line) for line in (work / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["width"] == 8
    # the report (reports/ in the current directory too) renders from the same place
    res = bench_cli("report", "--out", "out", cwd=work, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (work / "out" / "report" / "leaderboard.md").is_file()
    # a bad value is still its one error line, not a traceback
    res = bench_cli("run", "width=0", "--out", "out2", cwd=work, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "width" in res.stderr

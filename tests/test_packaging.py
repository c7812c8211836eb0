"""Packaging: import hygiene; the source tree run from its root; a wheel that holds the whole
tree, with a console script that works from elsewhere; the suite runs on the installed copy."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import torch_rlds

REPO = Path(__file__).resolve().parents[1]
# nox -s tests sets these: the wheel it built and installed, and that the suite runs on it.
WHEEL = os.environ.get("TORCH_RLDS_WHEEL")
EXPECT_INSTALLED = os.environ.get("TORCH_RLDS_EXPECT_INSTALLED") == "1"


def _run(args: list[str], cwd: Path | None = None, timeout: float = 300,
         **env: str | None) -> subprocess.CompletedProcess:
    environ = {**os.environ, **{k: v for k, v in env.items() if v is not None}}
    for key in [k for k, v in env.items() if v is None]:
        environ.pop(key, None)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=environ,
                          cwd=cwd)


def _python(code: str, cwd: Path | None = None, **env: str | None) -> str:
    result = _run([sys.executable, "-c", code], cwd=cwd, **env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_leaves_tensorflow_and_jax_out():
    out = _python("import sys, torch_rlds, torch_rlds.adapters, torch_rlds.config, "
                  "torch_rlds.synthetic; print(sorted(m for m in ('tensorflow', 'jax') "
                  "if m in sys.modules))")
    assert out.strip() == "[]"


def test_reading_a_dataset_never_imports_tensorflow(small_dataset):
    out = _python(
        "import sys, torch_rlds\n"
        f"ds = torch_rlds.RLDSDataset({str(small_dataset)!r}, action_horizon=4)\n"
        "batch = next(iter(torch_rlds.DataLoader(ds, batch_size=4)))\n"
        "print(tuple(batch['action'].shape), 'tensorflow' in sys.modules, 'jax' in sys.modules)"
    )
    assert out.strip() == "(4, 4, 7) False False"


@pytest.mark.skipif(not EXPECT_INSTALLED, reason="only nox -s tests runs on the installed wheel")
def test_the_suite_runs_on_the_installed_copy_not_the_checkout():
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    # (nox's environments live in the checkout's .nox/: what matters is site-packages)
    assert Path(torch_rlds.__file__).resolve().parent == site / "torch_rlds"
    # Processes the tests start, from the checkout's root, import the installed copy too.
    out = _python("import json, torch_rlds, torch_rlds.adapters; print(json.dumps("
                  "[torch_rlds.__file__, torch_rlds.adapters.__file__]))", cwd=REPO)
    init, adapters = (Path(p).resolve() for p in json.loads(out))
    assert init.parent == site / "torch_rlds" and adapters.parent == site / "torch_rlds/adapters"
    assert (REPO / "torch_rlds").resolve() not in init.parents


# -- the source tree, from its root --------------------------------------------------------------
_WHERE = ("import json, torch_rlds, torch_rlds.adapters.jax, torch_rlds.adapters.orbax\n"
          "from torch_rlds.config import config_names\n"
          "print(json.dumps([torch_rlds.__file__, torch_rlds.adapters.__file__, "
          "torch_rlds.adapters.jax.__file__, config_names()]))")


def _assert_checkout(out: str) -> None:
    init, adapters, jax_adapter, configs = json.loads(out)
    assert Path(init) == REPO / "torch_rlds" / "__init__.py"
    assert Path(adapters) == REPO / "adapters" / "__init__.py"
    assert Path(jax_adapter) == REPO / "adapters" / "jax.py"
    assert set(configs) == {Path(p).stem for p in glob.glob(str(REPO / "configs" / "*.yaml"))}


def test_checkout_root_as_working_directory_finds_adapters_and_configs():
    # Python puts the working directory first on sys.path (PYTHONSAFEPATH would not).
    _assert_checkout(_python(_WHERE, cwd=REPO, PYTHONSAFEPATH=None))


def test_checkout_root_on_pythonpath_from_elsewhere(tmp_path):
    _assert_checkout(_python(_WHERE, cwd=tmp_path, PYTHONPATH=str(REPO), PYTHONSAFEPATH=None))


def test_a_folder_named_adapters_beside_another_package_is_not_mounted(tmp_path):
    # The mount is for this project's checkout only: a stray copy of torch_rlds/ beside some
    # other adapters/ folder gets no subpackage from it.
    import shutil

    shutil.copytree(REPO / "torch_rlds", tmp_path / "torch_rlds")
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "__init__.py").write_text("raise SystemExit('mounted')\n")
    (tmp_path / "setup.cfg").write_text("[metadata]\nname = something-else\n")
    out = _python("import sys, torch_rlds; print('torch_rlds.adapters' in sys.modules)",
                  cwd=tmp_path, PYTHONSAFEPATH=None)
    assert out.strip() == "False"


@pytest.mark.slow
def test_demo_passes_from_the_checkout_root():
    # The README's first line runs `python3 -m torch_rlds demo` here; its resume runs in a
    # child process started the same way.
    result = _run([sys.executable, "-m", "torch_rlds", "demo"], cwd=REPO, PYTHONSAFEPATH=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "ALL CHECKS PASSED"


# -- the wheel --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel nox built and installed, else one built here from the tree."""
    if WHEEL:
        return Path(WHEEL)
    import shutil

    # From a copy: a build folder left in the checkout would add its stale files to the wheel.
    tree = tmp_path_factory.mktemp("tree") / "torch_rlds"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(
        ".git", ".nox", ".venv", "build", "dist", "*.egg-info", "__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(tree)], check=True, capture_output=True, timeout=300)
    (built,) = dist.glob("torch_rlds-*.whl")
    return built


def _tree_files() -> set[str]:
    """What the wheel must hold: every module of torch_rlds/ and adapters/, every config, the
    design file."""
    want = {"torch_rlds/DESIGN.md"}
    for base, dest in (("torch_rlds", "torch_rlds"), ("adapters", "torch_rlds/adapters")):
        for path in (REPO / base).rglob("*.py"):
            want.add(f"{dest}/{path.relative_to(REPO / base).as_posix()}")
    for path in (REPO / "configs").glob("*.py"):
        want.add(f"torch_rlds/configs/{path.name}")
    for path in (REPO / "configs").rglob("*.yaml"):
        want.add(f"torch_rlds/configs/{path.relative_to(REPO / 'configs').as_posix()}")
    return want


@pytest.mark.slow
def test_wheel_holds_exactly_the_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    code = {n for n in names if not n.startswith("torch_rlds-") and ".dist-info/" not in n}
    want = _tree_files()
    assert "torch_rlds/bench/_main.py" in want  # the suite is part of the package
    assert want - code == set(), "files of the tree missing from the wheel"
    assert code - want == set(), "files in the wheel that the tree does not have"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "torch-rlds = torch_rlds.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_console_script_of_the_wheel_runs_from_elsewhere(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    script = site / "bin" / "torch-rlds"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {"PYTHONPATH": str(site), "PYTHONSAFEPATH": None}
    where = _python("import torch_rlds, torch_rlds.bench; print(torch_rlds.bench.__file__)",
                    cwd=outside, **env)
    assert Path(where.strip()).is_relative_to(site)

    demo = _run([str(script), "demo"], cwd=outside, **env)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert demo.stdout.strip().splitlines()[-1] == "ALL CHECKS PASSED"
    dataset = next(line for line in demo.stdout.splitlines() if "dataset " in line)
    path = dataset.split("dataset ", 1)[1].split(" (", 1)[0]

    inspect = _run([str(script), "inspect", path, "--split", "val"], cwd=outside, **env)
    assert inspect.returncode == 0, inspect.stderr
    assert "torch_rlds_demo 1.0.0" in inspect.stdout and "split val:" in inspect.stdout
    assert "split train:" not in inspect.stdout

    bench = _run([str(script), "bench", "--quick", "--skip-tf", "--out", str(tmp_path / "b")],
                 cwd=outside, **env)
    assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-2000:]
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["throughput"]["torch_rlds"], "no torch_rlds throughput measured"


def test_the_design_ships_with_the_package_and_every_contract_cited_is_in_it():
    import importlib.resources
    import re

    design = importlib.resources.files("torch_rlds").joinpath("DESIGN.md").read_text()
    section = design.split("## Contracts", 1)[1].split("\n## ", 1)[0]
    numbered = {int(n) for n in re.findall(r"^(\d+)\. \*\*", section, re.MULTILINE)}
    assert numbered == set(range(1, 9))
    cited = []
    for base in ("torch_rlds", "adapters"):
        for path in (REPO / base).rglob("*.py"):
            for match in re.finditer(r"contracts? (\d+)(?: of ([\w/.]+))?", path.read_text()):
                cited.append((path.name, int(match[1]), match[2]))
    assert cited, "no docstring cites a contract"
    assert [c for c in cited if c[2] != "torch_rlds/DESIGN.md" or c[1] not in numbered] == []

"""Packaging: import hygiene, and a non-editable install (a wheel) that carries the adapters
and the YAML configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path | None = None, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env={**os.environ, **env}, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_leaves_tensorflow_and_jax_out():
    out = _run("import sys, torch_rlds, torch_rlds.adapters, torch_rlds.config, "
               "torch_rlds.synthetic; print(sorted(m for m in ('tensorflow', 'jax') "
               "if m in sys.modules))")
    assert out.strip() == "[]"


def test_reading_a_dataset_never_imports_tensorflow(small_dataset):
    out = _run(
        "import sys, torch_rlds\n"
        f"ds = torch_rlds.RLDSDataset({str(small_dataset)!r}, action_horizon=4)\n"
        "batch = next(iter(torch_rlds.DataLoader(ds, batch_size=4)))\n"
        "print(tuple(batch['action'].shape), 'tensorflow' in sys.modules, 'jax' in sys.modules)"
    )
    assert out.strip() == "(4, 4, 7) False False"


@pytest.mark.slow
def test_wheel_ships_adapters_configs_and_console_script(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("torch_rlds-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "torch_rlds/adapters/__init__.py" in names
    assert "torch_rlds/configs/demo.yaml" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "torch-rlds = torch_rlds.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = _run(
        "import json, torch_rlds, torch_rlds.adapters\n"
        "from torch_rlds.config import config_names, load_config\n"
        "print(json.dumps([torch_rlds.__file__, torch_rlds.adapters.__file__, config_names(), "
        "load_config('demo').data.path]))",
        cwd=outside, PYTHONPATH=str(target),
    )
    init, adapters, configs, demo_path = json.loads(out)
    assert init.startswith(str(target)) and adapters.startswith(str(target))
    assert "demo" in configs and demo_path == "demo"

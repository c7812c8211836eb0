"""``torch-rlds check`` (torch_rlds.adapters.check.main): its steps, its ✓/✗ lines, its exit
status, and that it notices a resume that is not exact."""

from __future__ import annotations

import pytest

from torch_rlds.adapters import check
from torch_rlds.adapters.openpi import OpenpiDataLoader

DONE = "ALL TESTS PASSED! ✓"


def _lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_check_passes_on_the_demo_config(capsys):
    assert check.main(["--config-name=demo"]) == 0
    lines = _lines(capsys)
    assert lines[-1] == DONE
    for step in range(1, 7):
        assert any(line.startswith(f"✓ step {step}:") for line in lines), (step, lines)
    assert not any(line.startswith("✗") for line in lines)
    shapes = next(line for line in lines if line.startswith("✓ step 2:"))
    assert "obs.state (32, 1, 7), actions (32, 16, 7)" in shapes
    refuse = next(line for line in lines if line.startswith("✓ step 6:"))
    assert "Dataloader must be created with persistent_iterator=True" in refuse


def test_comprehensive_adds_cycles_ids_and_the_multihost_run(capsys, monkeypatch):
    from torch_rlds.adapters import _multihost

    calls = []

    def two_hosts(out, **kwargs):
        calls.append(kwargs)
        return [(True, "the hosts' sample ids are disjoint")], {"steps": 12, "save_at": 5}

    monkeypatch.setattr(_multihost, "run_two_hosts", two_hosts)
    assert check.main(["--config-name", "demo", "--comprehensive", "loader.num_workers=0"]) == 0
    lines = _lines(capsys)
    assert lines[-1] == DONE
    for step in (7, 8, 9):
        assert any(line.startswith(f"✓ step {step}:") for line in lines), (step, lines)
    ids = next(line for line in lines if line.startswith("✓ step 8:"))
    assert "no duplicate, no gap" in ids and "every one of the 980 steps of epoch 0" in ids
    assert calls[0]["config"] == "demo" and calls[0]["overrides"] == ["loader.num_workers=0"]
    assert "✓   the hosts' sample ids are disjoint" in lines

    monkeypatch.setattr(_multihost, "run_two_hosts", lambda out, **kw: (
        [(False, "global batches 5..11 after the restart equal the uninterrupted run's")],
        {"steps": 12, "save_at": 5}))
    assert check.main(["--comprehensive", "loader.num_workers=0"]) == 1
    lines = _lines(capsys)
    assert "✗   global batches 5..11 after the restart equal the uninterrupted run's" in lines
    assert lines[-1].startswith("✗ 1 CHECK FAILED")


def test_a_resume_that_is_not_exact_fails_the_check(capsys, monkeypatch):
    original = OpenpiDataLoader.load_dataloader_state

    def off_by_one(self, directory):
        seen = original(self, directory)
        next(iter(self))  # drops the first batch after the restore
        return seen

    monkeypatch.setattr(OpenpiDataLoader, "load_dataloader_state", off_by_one)
    assert check.main(["loader.num_workers=0"]) == 1
    lines = _lines(capsys)
    step5 = next(line for line in lines if "step 5" in line)
    assert step5.startswith("✗") and "batch 5 differs from the uninterrupted run's" in step5
    assert DONE not in lines


@pytest.mark.parametrize("override, expected", [
    ("data.path=/nonexistent/rlds/1.0.0", "✗ step 1"),
    ("loader.batch_size=0", "✗ config demo: ConfigError: loader.batch_size must be an int >= 1"),
])
def test_bad_input_gives_a_cross_and_a_nonzero_exit(capsys, override, expected):
    assert check.main([override]) == 1
    lines = _lines(capsys)
    assert any(line.startswith(expected) for line in lines), lines
    assert DONE not in lines


def test_check_openpi_and_torch_adapters_import_neither_jax_nor_orbax():
    import subprocess
    import sys

    code = ("import sys, torch_rlds.adapters, torch_rlds.adapters.check, "
            "torch_rlds.adapters.openpi, torch_rlds.adapters.torch, torch_rlds.adapters.jax; "
            "print(sorted(m for m in ('jax', 'orbax', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"

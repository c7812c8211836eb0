"""The ``torch-rlds`` command: one-line errors, ``inspect --split``, ``config``, ``stats`` on a
mixture and its table."""

from __future__ import annotations

import re

import pytest

from torch_rlds import _published, cli
from torch_rlds.config import load_config


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize("argv, message", [
    (["inspect", "/nonexistent/dataset"], r"^torch-rlds inspect: FileNotFoundError: "
                                          r"/nonexistent/dataset: no dataset_info.json"),
    (["stats", "--config-name", "nope"], r"^torch-rlds stats: ConfigError: no config named "
                                         r"'nope'"),
    (["demo", "data.obs_window=0"], r"^torch-rlds demo: ConfigError: data.obs_window must be "
                                    r"an int >= 1 \(got 0\)"),
    (["bench", "--quick", "--skip-tf", "--config-name", "nope"],
     r"^torch-rlds bench: ConfigError: no config named 'nope'"),
    (["config", "--config-name", "demo", "loader.batch_size=0"],
     r"^torch-rlds config: ConfigError: loader.batch_size must be an int >= 1 \(got 0\)"),
])
def test_an_error_is_one_line_and_a_nonzero_exit(argv, message, capsys, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.main(argv) == 1
    lines = _error_lines(capsys)
    assert len(lines) == 1, lines
    assert re.search(message, lines[0]), lines[0]
    assert lines[0].endswith("(--traceback for the whole trace)")


def test_traceback_flag_or_variable_prints_the_whole_trace(capsys, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.main(["inspect", "/nonexistent/dataset", "--traceback"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "resolve_dataset_dir" in err
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    assert cli.main(["inspect", "/nonexistent/dataset"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_message_with_line_breaks_stays_on_one_line():
    assert cli.one_line(ValueError("first\n  second\nthird")) == "ValueError: first second third"


def test_inspect_split_shows_only_that_split(small_dataset, capsys):
    assert cli.main(["inspect", str(small_dataset), "--split", "val", "--steps"]) == 0
    out = capsys.readouterr().out
    assert "split val: 2 episodes" in out and "split train" not in out
    assert "--split val: 2 episodes (val[0:2])" in out
    assert re.search(r"^split val: \d+ steps", out, re.M)
    assert cli.main(["inspect", str(small_dataset)]) == 0
    out = capsys.readouterr().out
    assert "split val:" in out and "split train:" in out


def test_config_command_prints_a_config_that_loads_back(tmp_path, capsys):
    assert cli.main(["config", "--config-name", "bridge", "data.data_dir=/data",
                     "loader.batch_size=64"]) == 0
    out = capsys.readouterr().out
    assert "  batch_size: 64" in out and "# an int >= 1" in out
    assert re.search(r"^  shuffle: true +# true or false", out, re.M)
    assert re.search(r"^    resize: pad +# one of \['pad', 'stretch'\]", out, re.M)
    saved = tmp_path / "resolved.yaml"
    saved.write_text(out)
    assert load_config(str(saved)).data == load_config("bridge", ["data.data_dir=/data"]).data
    assert load_config(str(saved)).loader.batch_size == 64


def test_config_command_on_a_mixture(capsys):
    assert cli.main(["config", "--config-name", "demo_mixture"]) == 0
    out = capsys.readouterr().out
    assert "mixture:" in out and "overrides: [data.split=val]" in out and "loader:" in out


@pytest.fixture(scope="module")
def bridge_like(tmp_path_factory):
    return _published.write_published(tmp_path_factory.mktemp("bridge"), "bridge")


def test_stats_table_labels_each_dimension_by_its_key(bridge_like, tmp_path, capsys):
    assert cli.main(["stats", "--config-name", "bridge", f"data.path={bridge_like}",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("  ")]
    assert rows[0].split() == ["dimension", "mean", "std", "min", "max", "q01", "q99"]
    labels = [row.split()[0] for row in rows if row.split()[0] != "dimension"]
    assert labels == ([f"state[{i}]" for i in range(7)]
                      + [f"action/world_vector[{i}]" for i in range(3)]
                      + [f"action/rotation_delta[{i}]" for i in range(3)]
                      + ["action/open_gripper"])
    # Aligned: every row of a table is as long as its header, and each column ends in one place.
    header = rows[0]
    for row in rows[1:8]:
        assert len(row) == len(header)


def test_stats_on_a_mixture_computes_each_dataset(small_dataset, tmp_path, capsys):
    child = tmp_path / "child.yaml"
    child.write_text(f"data:\n  path: {small_dataset}\n")
    mixture = tmp_path / "mix.yaml"
    mixture.write_text("mixture:\n  datasets:\n"
                       f"    - config: {child}\n      overrides: [data.split=train]\n"
                       f"    - config: {child}\n      overrides: [data.split=val]\n")
    out_dir = tmp_path / "assets"
    assert cli.main(["stats", "--config-name", str(mixture), "--no-progress",
                     "--output", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "split 'train'" in out and "split 'val'" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["0-child", "1-child"]
    assert (out_dir / "1-child" / "norm_stats.json").exists()
    assert cli.main(["stats", "--config-name", str(mixture), "--output",
                     str(tmp_path / "one.json")]) == 1
    assert "is a mixture of 2 datasets; give a folder" in capsys.readouterr().err

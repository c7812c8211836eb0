"""The README's code: its JAX example runs as pasted into a script, and without its main guard
fails with an error that says to add one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _jax_example() -> str:
    text = README.read_text()
    section = text[text.index("### JAX, multi-host"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run_script(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_jax_example_runs_as_pasted_into_a_script(tmp_path):
    code = _jax_example()
    assert 'if __name__ == "__main__":' in code
    result = _run_script(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_without_the_main_guard_the_error_says_to_add_one(tmp_path):
    code = _jax_example()
    head, _, guarded = code.partition('if __name__ == "__main__":')
    unguarded = head + textwrap.dedent(guarded.split("\n", 1)[1])
    assert "if __name__" not in unguarded
    result = _run_script(unguarded, tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: DataLoader worker")
    assert 'put the script\'s training code under `if __name__ == "__main__":`' in last


def test_every_command_line_of_the_readme_parses():
    """Each ``torch-rlds`` line of the README's shell blocks names a command and flags that
    exist (parsed, not run: they name datasets under /data)."""
    import shlex

    from torch_rlds.cli import build_parser

    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("torch-rlds ")]
    assert len(commands) >= 8
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README: torch-rlds {' '.join(argv)} does not parse")

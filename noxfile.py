"""Sessions: ``tests`` (the default), ``lint`` and ``bench``.

Every session installs under ``.ci/constraints.txt``, which pins torch to the CPU build; the
ranges in ``setup.cfg`` stay open for users.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ".ci/constraints.txt"
PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Install torch_rlds with its test and jax extras and run pytest."""
    session.install("-c", CONSTRAINTS, "-e", ".[test,jax]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Run ruff over the package, the adapters and the tests."""
    session.install("ruff")
    session.run("ruff", "check", "--config", ".ci/ruff.toml", "torch_rlds", "adapters", "tests",
                "noxfile.py")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmark suite against tf.data (TensorFlow is installed here only)."""
    session.install("-c", CONSTRAINTS, "-e", ".[bench]")
    session.run("torch-rlds", "bench", *session.posargs)

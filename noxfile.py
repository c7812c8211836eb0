"""Sessions: ``tests`` (the default), ``dev``, ``lint`` (ruff and mypy) and ``bench``.

``tests`` runs the suite against what a user installs: the wheel built from this tree, not the
tree itself. ``dev`` is the quick loop on an editable install. Every session installs under
``.ci/constraints.txt``, which pins torch to the CPU build; the ranges in ``setup.cfg`` stay
open for users.
"""

from __future__ import annotations

import glob
import os
import shutil

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ".ci/constraints.txt"
PYTHON = "3.11"
EXTRAS = "test,jax"


def _build_wheel(session: nox.Session) -> str:
    """Build the wheel of this tree into the session's temporary folder; returns its path."""
    dist = os.path.join(session.create_tmp(), "dist")
    # setuptools builds in ./build, and a file left there by an earlier build would end up in
    # this wheel even when the tree no longer has it.
    for stale in (dist, "build", *glob.glob("*.egg-info")):
        shutil.rmtree(stale, ignore_errors=True)
    session.run("python", "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", dist, ".")
    (wheel,) = glob.glob(os.path.join(dist, "torch_rlds-*.whl"))
    return os.path.abspath(wheel)


PARALLEL = ("-n", "2", "--dist", "loadfile")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Build the wheel, install it with its test and jax extras and run pytest on it.

    ``PYTHONSAFEPATH`` keeps the checkout's root off ``sys.path`` in pytest and in every
    process the tests start, so ``import torch_rlds`` is the installed copy everywhere
    (``tests/test_packaging.py`` checks it). The tests run in two processes (pytest-xdist),
    each test file in one of them (its module fixtures built once); each process has a cache
    folder of its own (``tests/conftest.py``). Arguments after ``--`` replace these.
    """
    wheel = _build_wheel(session)
    session.install("-c", CONSTRAINTS, f"{wheel}[{EXTRAS}]")
    # The same version number as an earlier build: reinstall, or pip keeps the old files.
    session.install("--no-deps", "--force-reinstall", wheel)
    session.run("pytest", *(session.posargs or PARALLEL),
                env={"PYTHONSAFEPATH": "1", "TORCH_RLDS_WHEEL": wheel,
                     "TORCH_RLDS_EXPECT_INSTALLED": "1"})


@nox.session(python=PYTHON)
def dev(session: nox.Session) -> None:
    """Install the checkout editable (changes apply without a reinstall) and run pytest."""
    session.install("-c", CONSTRAINTS, "-e", f".[{EXTRAS}]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Run ruff over the package, the adapters and the tests, then mypy over the package and
    the adapters (its settings: setup.cfg's ``[mypy]``), against the pinned dependencies."""
    session.install("ruff")
    session.run("ruff", "check", "--config", ".ci/ruff.toml", "torch_rlds", "adapters", "tests",
                "noxfile.py")
    session.install("-c", CONSTRAINTS, "-e", ".", "mypy")
    session.run("mypy")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmark suite against tf.data (TensorFlow is installed here only)."""
    session.install("-c", CONSTRAINTS, "-e", ".[bench]")
    session.run("torch-rlds", "bench", *session.posargs)

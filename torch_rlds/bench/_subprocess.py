"""Each measurement runs in a fresh Python process, so its peak memory and its start-up are its
own and nothing one pipeline imported or cached helps another.

The parent calls :func:`run_task`; the child imports the task's module, runs it under
:class:`~torch_rlds.bench._monitor.ResourceMonitor` and writes ``{"ok", "result", "memory",
"foreign_cpu_pct", "modules"}`` or ``{"ok": false, "error"}`` as JSON. ``modules`` says
whether torch and tensorflow were imported, which shows that no torch_rlds figure needed
TensorFlow.

A group (:data:`GROUP`, ``{"jobs": [{"task", "kwargs"}, ...]}``) runs several tasks one after
the other in one process, each result ``{"ok", "result"}`` or ``{"ok": false, "error"}`` in a
list; the memory and CPU figures are the whole group's. The quick run uses it: its figures only
show that every measurement works, and a process per measurement would cost most of its time.

Tasks marked torch-free (tf.data, the decode limit) must not be charged for torch, which
``torch_rlds/__init__.py`` imports. Their child registers an empty ``torch_rlds`` package
(its real folder as ``__path__``, its ``__init__`` not run) before importing the task, so only
the modules the task names are loaded.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

# task name -> ("module:function", torch_free)
TASKS: dict[str, tuple[str, bool]] = {
    "torch_throughput": ("torch_rlds.bench._torch:throughput", False),
    "torch_save_states": ("torch_rlds.bench._torch:save_states", False),
    "torch_resume": ("torch_rlds.bench._torch:resume", False),
    "torch_state_cost": ("torch_rlds.bench._torch:state_cost", False),
    "remote_startup": ("torch_rlds.bench._remote:startup", False),
    "remote_throughput": ("torch_rlds.bench._remote:throughput", False),
    "limit": ("torch_rlds.bench._limit:decode_limit", True),
    "tf_throughput": ("torch_rlds.bench._tfdata:throughput", True),
    "tf_save_checkpoints": ("torch_rlds.bench._tfdata:save_checkpoints", True),
    "tf_resume_checkpoint": ("torch_rlds.bench._tfdata:resume_checkpoint", True),
    "tf_resume_skip": ("torch_rlds.bench._tfdata:resume_skip", True),
    "tf_checkpoint_cost": ("torch_rlds.bench._tfdata:checkpoint_cost", True),
    "shuffle_quality": ("torch_rlds.bench._shuffle:shuffle_quality", True),
    "torch_worker_memory": ("torch_rlds.bench._memory:worker_memory", False),
    "torch_index_build": ("torch_rlds.bench._index:index_build", False),
    "torch_first_batch": ("torch_rlds.bench._index:first_batch", False),
}
# Several tasks run one after the other in one process: see run_group.
GROUP = "group"

_QUIET_TF = {"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}

# Runs in the child before anything of torch_rlds is imported.
_BOOT = """
import importlib.util, json, sys, types
with open(sys.argv[1]) as f:
    torch_free = json.load(f)["torch_free"]
if torch_free:
    spec = importlib.util.find_spec("torch_rlds")
    package = types.ModuleType("torch_rlds")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["torch_rlds"] = package
from torch_rlds.bench._subprocess import child
sys.exit(child(sys.argv[1], sys.argv[2]))
"""


def run_task(task: str, kwargs: dict[str, Any], *, timeout_s: float = 3600) -> dict[str, Any]:
    """Run ``task`` with ``kwargs`` (JSON-serialisable) in a fresh process.

    Returns the child's record plus ``wall_s`` (the whole child, imports included). A child that
    crashes, times out or raises gives ``{"ok": False, "error": ...}``; nothing is raised here,
    so one failed measurement never hides the others.
    """
    if task == GROUP:
        members = [job["task"] for job in kwargs["jobs"]]
        unknown = sorted(set(members) - set(TASKS))
        torch_free = all(TASKS[m][1] for m in members if m in TASKS)
    else:
        unknown = [] if task in TASKS else [task]
        torch_free = task in TASKS and TASKS[task][1]
    if unknown:
        raise ValueError(f"unknown bench tasks {unknown} (tasks: {sorted(TASKS)})")
    with tempfile.TemporaryDirectory(prefix="torch_rlds_bench_") as tmp:
        request_path = os.path.join(tmp, "request.json")
        result_path = os.path.join(tmp, "result.json")
        with open(request_path, "w") as f:
            json.dump({"task": task, "torch_free": torch_free, "kwargs": kwargs}, f)
        start = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", _BOOT, request_path, result_path],
                                  env={**os.environ, **_QUIET_TF}, timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"{task}: timed out after {timeout_s:.0f} s"}
        wall = round(time.perf_counter() - start, 3)
        try:
            with open(result_path) as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError):
            return {"ok": False, "wall_s": wall,
                    "error": f"{task}: the process exited with code {proc.returncode} and wrote "
                             "no result (killed, or out of memory?)"}
    record["wall_s"] = wall
    return record


def child(request_path: str, result_path: str) -> int:
    """The child's side: run the task of ``request_path``, write the record to
    ``result_path``; returns the exit code."""
    from torch_rlds.bench._monitor import ResourceMonitor

    with open(request_path) as f:
        request = json.load(f)
    monitor = ResourceMonitor()
    with monitor:
        if request["task"] == GROUP:
            results = [_call(job["task"], job["kwargs"]) for job in request["kwargs"]["jobs"]]
            record: dict[str, Any] = {"ok": True, "result": results}
        else:
            record = _call(request["task"], request["kwargs"])
    record["memory"] = monitor.memory()
    foreign = monitor.foreign_cpu_pct
    record["foreign_cpu_pct"] = None if foreign is None else round(foreign, 1)
    record["modules"] = {m: m in sys.modules for m in ("torch", "tensorflow")}
    with open(result_path, "w") as f:
        json.dump(record, f, default=_jsonable)
    return 0 if record["ok"] else 1


def _call(task: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{"ok": True, "result"}`` of one task, or ``{"ok": False, "error"}``."""
    module, _, name = TASKS[task][0].partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
        return {"ok": True, "result": fn(**kwargs)}
    except Exception as e:  # reported to the parent, which records it and goes on
        traceback.print_exc()
        return {"ok": False, "error": f"{task}: {type(e).__name__}: {e}"}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)

"""A training-like script for the fault tests (tests/test_faults.py), and a zygote that forks it.

``train`` builds a DataLoader with workers over an RLDS dataset, resumes from ``--state`` when
that file exists, and for every batch appends one line to ``--log``::

    {"batch": 17, "ids": [[episode_index, step_index, epoch], ...]}

(flushed and fsynced before the next batch), saving the loader's state every ``--save-every``
batches, after the batch's line. It stops after ``--batches`` batches in all (counted by the
restored ``batches_seen``), or never with ``--batches 0``. So a run killed at any point and
restarted from its state, with the log cut back to the state's ``batches_seen`` lines, must
log exactly what an uninterrupted run logs.

``save-loop`` saves a loader's state to ``--state`` over and over, for the killed-save tests.

Run either directly (``python tests/preempt_worker.py train --dataset D --state S --log L``),
or through ``zygote``: a process that imports torch_rlds once, then reads one JSON command a
line on stdin and answers one JSON line on stdout::

    {"run": [argv...]}  -> {"pid": p}         fork a child that runs main(argv)
    {"wait": p, "timeout": t} -> {"pid": p, "status": s}   s: exit code, or -signal; a
                           child still running after t seconds is killed ("timed_out": true)
    {"quit": true}      -> (exits)

Importing torch takes seconds; forking a process that already has it takes milliseconds, which
is what lets the tests kill and restart a "training run" dozens of times. The children are
plain processes (no pytest in them) with their own process group.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def _loader(args: argparse.Namespace):
    import torch_rlds

    dataset = torch_rlds.RLDSDataset(args.dataset, obs_window=2, action_horizon=4,
                                     shuffle_window=2, repeat=True, seed=args.seed)
    method = getattr(args, "start_method", None)
    if method == "forkserver":
        import multiprocessing

        multiprocessing.set_forkserver_preload(["torch_rlds"])
    return torch_rlds.DataLoader(dataset, batch_size=args.batch_size,
                                 num_workers=args.workers, multiprocessing_context=method)


def train(args: argparse.Namespace) -> int:
    if args.on_sigterm == "exit":
        # What a training script with a preemption handler does: unwind, then exit.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    loader = _loader(args)
    state = Path(args.state)
    if state.exists():
        loader.load_state(state)
    iterator = iter(loader)
    first = True
    with open(args.log, "a") as log:
        while not args.batches or loader.batches_seen < args.batches:
            batch = next(iterator)
            if first and args.pids:
                _record_pids(args.pids, iterator)
            first = False
            meta = batch["meta"]
            ids = list(zip(meta["episode_index"].tolist(), meta["step_index"].tolist(),
                           meta["epoch"].tolist()))
            log.write(json.dumps({"batch": loader.batches_seen - 1, "ids": ids}) + "\n")
            log.flush()
            os.fsync(log.fileno())
            if loader.batches_seen % args.save_every == 0:
                loader.save_state(state)
            if args.exit_after and loader.batches_seen >= args.exit_after:
                os._exit(3)  # dies without any cleanup
            if args.sleep:
                time.sleep(args.sleep)
    return 0


def _record_pids(path: str, iterator) -> None:
    """The run's pids (its workers, and every process below it: a fork server, the resource
    tracker) and the shared-memory files they map."""
    import psutil

    pids = [w.pid for w in getattr(iterator, "_workers", [])]
    below = [p.pid for p in psutil.Process().children(recursive=True)]
    shm = set()
    for pid in [os.getpid(), *below]:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                shm |= {line.split(None, 5)[5].strip() for line in maps
                        if " /dev/shm/" in line and not line.rstrip().endswith("(deleted)")}
        except OSError:
            pass
    with open(path, "a") as f:
        f.write(json.dumps({"main": os.getpid(), "workers": pids, "below": below,
                            "shm": sorted(shm)}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_loop(args: argparse.Namespace) -> int:
    """Save the state again and again, each time with ``batches_seen`` one higher than the
    file's (so every complete file differs from the one before); ``--ready`` is created after
    the first save, and the loop starts once ``--go`` exists. With ``--stuck`` the second save
    blocks forever between writing its temporary file and renaming it."""
    loader = _loader(args)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = Path(args.state)
    if state.exists():
        loader.batches_seen = json.loads(state.read_text())["torch_rlds"]["batches_seen"] + 1
    loader.save_state(state)
    Path(args.ready).touch()
    while not os.path.exists(args.go):
        time.sleep(0.001)
    if args.stuck:
        real_fsync = os.fsync

        def stuck(fd: int) -> None:
            real_fsync(fd)
            Path(args.stuck).touch()
            time.sleep(3600)

        os.fsync = stuck
    while True:
        loader.batches_seen += 1
        loader.save_state(state)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "save-loop"):
        p = sub.add_parser(name)
        p.add_argument("--dataset", required=True)
        p.add_argument("--state", required=True)
        p.add_argument("--workers", type=int, default=2 if name == "train" else 0)
        p.add_argument("--batch-size", type=int, default=3)
        p.add_argument("--seed", type=int, default=0)
    train_parser = sub.choices["train"]
    train_parser.add_argument("--log", required=True)
    train_parser.add_argument("--batches", type=int, default=0)
    train_parser.add_argument("--save-every", type=int, default=4)
    train_parser.add_argument("--pids", help="append the worker pids here")
    train_parser.add_argument("--sleep", type=float, default=0.0, help="seconds per batch")
    train_parser.add_argument("--on-sigterm", choices=["default", "exit"], default="default")
    train_parser.add_argument("--start-method", choices=["fork", "forkserver", "spawn"])
    train_parser.add_argument("--exit-after", type=int, default=0,
                              help="os._exit after this many batches")
    loop = sub.choices["save-loop"]
    loop.add_argument("--ready", required=True)
    loop.add_argument("--go", required=True)
    loop.add_argument("--stuck", help="block the second save after its fsync; touch this")
    sub.add_parser("zygote")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train":
        return train(args)
    if args.command == "save-loop":
        return save_loop(args)
    return zygote()


def zygote() -> int:
    # What every child needs, imported once (the fork server of a DataLoader preloads the same).
    import tensorflow_datasets  # noqa: F401

    import torch_rlds  # noqa: F401

    out = sys.stdout
    for line in sys.stdin:
        command = json.loads(line)
        if "run" in command:
            pid = os.fork()
            if pid == 0:
                # The child leaves the loop and exits the way a script does (atexit handlers,
                # multiprocessing shutting its workers down), or dies of a signal.
                os.setpgid(0, 0)
                os.dup2(2, 1)  # stdout is the zygote's answer pipe
                sys.stdin.close()
                return main(command["run"])
            answer = {"pid": pid}
        elif "wait" in command:
            answer = _wait(command["wait"], command.get("timeout", 120.0))
        else:
            return 0
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


def _wait(pid: int, timeout: float) -> dict:
    """Reap child ``pid``; one still running after ``timeout`` seconds is killed first."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"pid": pid, "status": os.waitstatus_to_exitcode(status)}
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return {"pid": pid, "status": os.waitstatus_to_exitcode(status), "timed_out": True}
        time.sleep(0.005)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

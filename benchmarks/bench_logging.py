"""Why logging on a thread does not come for free: 7 stacked MNIST models (784-128-10, k=2000 rows
each, batch 32) trained alone, and trained while another thread of the same process logs runs as
a grid does (a selection figure and a ``log_batch`` to a SQLite store, in a loop), or sends live
epoch losses (one ``log_batch`` per run), side by side with the ratios.

The training is dozens of small torch ops per step; each gives up the interpreter's lock and
waits to get it back, and a thread running Python (matplotlib, SQLAlchemy) holds it until the
interpreter takes it away (``sys.getswitchinterval``). So the logging costs the training about
what the logging itself takes, whichever thread it is on: the figures say how much, and how many
runs the logger got through meanwhile. A shorter switch interval is measured too.

Why not log in another process, then: the training beside a second process that keeps one core
busy (pure Python, no lock shared) is measured last. OpenMP's idle threads spin before they
sleep (libgomp: ``GOMP_SPINCOUNT``, ``OMP_WAIT_POLICY``), so torch's second thread, spinning
and preempted, holds up every parallel region on a 2-core machine; run this with
``GOMP_SPINCOUNT=0`` to see the other side of that trade, or with ``OMP_NUM_THREADS=1``.

    python benchmarks/bench_logging.py [--epochs 2] [--repeats 2]
    GOMP_SPINCOUNT=0 python benchmarks/bench_logging.py   # OpenMP's idle threads sleep at once
    OMP_NUM_THREADS=1 python benchmarks/bench_logging.py  # torch on one thread
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from _common import data_dir
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from altrack import report
from altrack.data import load_dataset
from altrack.models import build_model
from altrack.stack import train_stacked

# another tenant of the cores: pure Python until killed
BUSY = "print('spinning', flush=True)\nwhile True:\n    pass"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    data = load_dataset("mnist", data_dir())
    n = len(data.y_train)
    rows = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s))[:2000] for s in range(7)])

    def train() -> float:
        torch.manual_seed(0)
        models = [build_model("mnist") for _ in range(7)]
        generators = [torch.Generator().manual_seed(s) for s in range(7)]
        started = time.perf_counter()
        train_stacked(models, data.x_train, data.y_train, rows, epochs=args.epochs, batch_size=32, lr=1e-3,
                      generators=generators)  # fmt: skip
        return time.perf_counter() - started

    workdir = tempfile.TemporaryDirectory(prefix="altrack-bench-logging-")  # removed at exit, after an error too
    folder = Path(workdir.name)
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.create_experiment("bench")
    run_ids = [client.create_run(experiment).info.run_id for _ in range(7)]
    rng = np.random.default_rng(0)
    losses = rng.exponential(0.3, n)
    labels = data.y_train.numpy()
    pool = np.arange(400, n)
    selected = rng.choice(pool, 1600, replace=False)

    def fill_run(i: int) -> None:  # the bulk of a run's filling in: its figure and a metrics batch
        report.plot_selection(losses, labels, pool, selected, f"run {i}", folder / "selection.png")
        client.log_batch(run_ids[i % 7], metrics=[Metric("accuracy", 0.9, 0, i)])

    def live_send(i: int) -> None:  # one live-losses send: a batch per run of the stack
        for run_id in run_ids:
            client.log_batch(run_id, metrics=[Metric("loss/train", 1.0 / (i + 1), 0, i)])

    steps = itertools.count()  # one step per point across the whole script: no metric is logged twice

    def beside(work, interval: float) -> tuple[float, int]:
        stop, done, failed = threading.Event(), [0], []

        def loop() -> None:
            try:
                while not stop.is_set():
                    work(next(steps))
                    done[0] += 1
            except Exception as exc:  # noqa: BLE001 - raised on the main thread after the join
                failed.append(exc)

        default = sys.getswitchinterval()
        sys.setswitchinterval(interval)
        thread = threading.Thread(target=loop)
        thread.start()
        try:
            seconds = train()
        finally:
            stop.set()
            thread.join()
            sys.setswitchinterval(default)
        if failed:
            raise failed[0]
        return seconds, done[0]

    def beside_process() -> tuple[float, int | None]:
        # a bare interpreter (no imports to wait for) that says so, then spins until killed
        other = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
        try:
            if other.stdout.readline().strip() != "spinning":
                raise RuntimeError(f"the busy process did not start (exit {other.poll()})")
            return train(), None
        finally:
            other.kill()
            other.wait()

    train()  # warm-up
    fill_run(next(steps))
    live_send(next(steps))
    default = sys.getswitchinterval()
    # each case measures one repeat: (seconds, logger iterations meanwhile or None)
    cases = [("alone", lambda: (train(), None)),
             ("beside runs being filled in", lambda: beside(fill_run, default)),
             ("beside runs being filled in, switch 1e-5 s", lambda: beside(fill_run, 1e-5)),
             ("beside live-loss sends (7 runs each)", lambda: beside(live_send, default)),
             ("beside another process keeping a core busy", beside_process)]  # fmt: skip
    spin = ", ".join(f"{name}={os.environ[name]}" for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
                     if name in os.environ) or "default"  # fmt: skip
    print(f"7 stacked MNIST models, {args.epochs} epochs, {torch.get_num_threads()} torch threads, "
          f"OpenMP spin {spin}; seconds per repeat (logger iterations meanwhile)")  # fmt: skip
    alone = None
    for name, measure in cases:
        results = [measure() for _ in range(args.repeats)]
        best = min(seconds for seconds, _ in results)
        alone = best if alone is None else alone
        shown = " / ".join(f"{seconds:.2f}" + ("" if done is None else f" ({done})") for seconds, done in results)
        print(f"  {name:44s} {shown:28s} {best / alone:5.1f}x alone")
    workdir.cleanup()


if __name__ == "__main__":
    main()

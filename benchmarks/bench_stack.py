"""Training alone: N final MNIST models (784-128-10, k=2000 rows each, batch 32, 10 epochs) stacked
with ``altrack.stack.train_stacked`` and one at a time with ``altrack.train.train``, this tree
against other checkouts (``--reference REF``, repeatable; for example the last commit's:
``git archive HEAD altrack | tar -x -C REF``), side by side, with the seconds per model.

Each side runs in its own process on the same random rows of the real MNIST training split; the
stacked models' bits are printed as a digest, so the table also shows which trees train the same.

    python benchmarks/bench_stack.py --reference REF [--stacks 1,7,21] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import data_dir

SIDE = """
import hashlib, json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from altrack.data import load_dataset
from altrack.models import build_model
from altrack.train import train
try:
    from altrack.stack import train_stacked
except ImportError:  # a one-model-at-a-time tree
    train_stacked = None
data = load_dataset("mnist", sys.argv[2])
out = {}
torch.manual_seed(1)
alone = torch.randperm(len(data.y_train))[:2000]
for n in [int(s) for s in sys.argv[3].split(",")] if train_stacked else []:
    torch.manual_seed(0)
    models = [build_model("mnist") for _ in range(n)]
    rows = torch.stack([torch.randperm(len(data.y_train))[:2000] for _ in range(n)])
    best = float("inf")
    for _ in range(int(sys.argv[4])):
        start = time.perf_counter()
        result = train_stacked(models, data.x_train, data.y_train, rows, epochs=10, batch_size=32, lr=1e-3,
                               generators=[torch.Generator().manual_seed(i) for i in range(n)])
        best = min(best, time.perf_counter() - start)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for m in result.models for p in m.parameters()))
    out[f"stacked {n}"] = (best / n, digest.hexdigest()[:8])
best = float("inf")
for _ in range(int(sys.argv[4])):
    start = time.perf_counter()
    model = build_model("mnist")
    train(model, data.x_train[alone], data.y_train[alone], epochs=10, batch_size=32, lr=1e-3,
          generator=torch.Generator().manual_seed(0))
    best = min(best, time.perf_counter() - start)
out["one at a time"] = (best, "")
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", action="append", default=[], help="another checkout's altrack folder")
    parser.add_argument("--stacks", default="1,7,21", help="stack sizes to time")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many per stack size")
    args = parser.parse_args()
    sides = [("this tree", Path(__file__).resolve().parents[1])] + [(Path(r).name, Path(r).resolve())
                                                                   for r in args.reference]  # fmt: skip
    results = []
    for _, root in sides:
        command = [sys.executable, "-c", SIDE, str(root), data_dir(), args.stacks, str(args.repeats)]
        results.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
    print(
        f"seconds per MNIST model (10 epochs of 2000 rows), best of {args.repeats}; the stacked models' digest; "
        "ratio = that tree's seconds / this tree's"
    )
    print(f"{'':<16}" + "".join(f"{name:>22}" for name, _ in sides))
    base = results[0]
    for row in base:
        cells = []
        for position, result in enumerate(results):
            if row not in result:
                cells.append("-")
                continue
            seconds, digest = result[row]
            ratio = f"{seconds / base[row][0]:.2f}x" if position else ""
            cells.append(f"{seconds:7.3f} {digest:>8} {ratio:>5}")
        print(f"{row:<16}" + "".join(f"{cell:>22}" for cell in cells))


if __name__ == "__main__":
    main()

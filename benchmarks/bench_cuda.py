"""On a CUDA device: what the stacked trainer's graphs buy and what they keep.

- N stacked models (MLP: 1, 7, 35; CifarNet: 1, 5), eager steps against replayed CUDA graphs:
  seconds, and whether the weights and losses are the same bits;
- 35 stacked MLPs with one GEMM per model (``width=None``, the CPU's path) against a stack
  padded to 64 with one batched GEMM per layer (CUDA's);
- grouping invariance of the engine: a seed alone against the same seed among five, and one
  method alone against seven (selected indices and accuracies, exactly), on MNIST and on
  CIFAR-10-shaped random pixels; a CifarNet alone against the same one among 35 at width 35,
  trained and evaluated (``infer_stacked``).

    python benchmarks/bench_cuda.py [--data-dir DIR]   # reads mnist; CifarNet runs on random pixels
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import torch
from _common import data_dir
from bench_engine import synthetic_cifar

from altrack.config import GridConfig
from altrack.data import load_dataset, set_determinism
from altrack.models import build_model
from altrack.protocol import iterate_grid
from altrack.selection import available_methods
from altrack.settings import Settings
from altrack.stack import infer_stacked, train_stacked


def stacked(x, y, dataset, n_models, n, epochs, graphs, width=None):
    models = []
    for i in range(n_models):
        torch.manual_seed(100 + i)
        models.append(build_model(dataset, "cuda"))
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(len(x), generator=g)[:n] for _ in range(n_models)]).cuda()
    generators = [torch.Generator().manual_seed(7 + i) for i in range(n_models)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = train_stacked(models, x, y, idx, epochs=epochs, batch_size=32, lr=1e-3, generators=generators, graphs=graphs,
                        width=width)
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def same_bits(a, b) -> bool:
    params = all(torch.equal(p, q) for m1, m2 in zip(a.models, b.models, strict=True)
                 for p, q in zip(m1.parameters(), m2.parameters(), strict=True))  # fmt: skip
    return params and a.losses == b.losses


def grid(folder: str, methods, runs: int, seed: int, dataset: str = "mnist") -> dict[str, tuple[float, str]]:
    cfg = GridConfig(datasets=(dataset,), methods=tuple(methods), budgets=(2000,), runs=runs, seed=seed,
                     device="cuda", data_dir=folder, out=None, log_models=False, settings=Settings())  # fmt: skip
    return {f"{r.key.method}/{r.key.seed}": (r.test_accuracy, hashlib.sha1(r.selected_indices.tobytes()).hexdigest())
            for r in iterate_grid(cfg, progress=False)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default=data_dir())
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA device")
    set_determinism("cuda")
    data = load_dataset("mnist", args.data_dir, "cuda")
    for n_models in (1, 7, 35):
        stacked(data.x_train, data.y_train, "mnist", n_models, 2000, 2, True)  # warm-up
        eager, t_eager = stacked(data.x_train, data.y_train, "mnist", n_models, 2000, 10, False)
        graph, t_graph = stacked(data.x_train, data.y_train, "mnist", n_models, 2000, 10, True)
        print(f"{n_models:>2} MLPs, 2000 points, 10 epochs: eager {t_eager:.3f} s, graphs {t_graph:.3f} s "
              f"({t_eager / t_graph:.1f}x); same bits: {same_bits(eager, graph)}", flush=True)  # fmt: skip
    for name, width in (("one GEMM per model", None), ("padded to 64, batched GEMMs", 64)):
        stacked(data.x_train, data.y_train, "mnist", 35, 2000, 2, True, width)
        best = min(stacked(data.x_train, data.y_train, "mnist", 35, 2000, 10, True, width)[1] for _ in range(2))
        print(f"35 MLPs with graphs, {name}: {best:.3f} s", flush=True)
    x = torch.rand(512, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (512,), device="cuda")
    for n_models in (1, 5):
        stacked(x, y, "cifar10", n_models, 256, 2, True, 35)
        eager, t_eager = stacked(x, y, "cifar10", n_models, 256, 3, False, 35)
        graph, t_graph = stacked(x, y, "cifar10", n_models, 256, 3, True, 35)
        print(f"{n_models} CifarNets padded to 35, 256 points, 3 epochs: eager {t_eager:.3f} s, "
              f"graphs {t_graph:.3f} s; "
              f"same bits: {same_bits(eager, graph)}", flush=True)  # fmt: skip
    start = time.perf_counter()
    five = grid(args.data_dir, available_methods(), 5, 0)
    print(f"MNIST grid, 7 methods x 5 seeds at k=2000: {time.perf_counter() - start:.2f} s", flush=True)
    alone, one = grid(args.data_dir, available_methods(), 1, 3), grid(args.data_dir, ("coreset",), 1, 1)
    print("seed 3 alone == seed 3 among five:", all(alone[k] == five[k] for k in alone))
    print("coreset alone == coreset among seven methods:", one["coreset/1"] == five["coreset/1"])
    company = stacked(x, y, "cifar10", 35, 256, 2, True, 35)[0]
    alone = stacked(x, y, "cifar10", 1, 256, 2, True, 35)[0]  # model 0 of the 35, alone in its stack
    print("a CifarNet at width 35, alone == among 35 (trained):", same_bits(
        type(alone)(company.models[:1], company.losses[:1], company.diverged[:1]), alone))
    test = torch.rand(1000, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    many = infer_stacked(company.models, test, width=35, batch_size=32)
    single = infer_stacked(company.models[:1], test, width=35, batch_size=32)
    print("a CifarNet at width 35, alone == among 35 (logits and embeddings):",
          torch.equal(many[0][0], single[0][0]) and torch.equal(many[1][0], single[1][0]))
    with tempfile.TemporaryDirectory(prefix="altrack-synthetic-") as folder:
        synthetic_cifar(Path(folder))
        start = time.perf_counter()
        five = grid(folder, available_methods(), 5, 0, "cifar10")
        print(f"CIFAR-shaped grid, 7 methods x 5 seeds at k=2000: {time.perf_counter() - start:.2f} s", flush=True)
        alone, one = grid(folder, available_methods(), 1, 3, "cifar10"), grid(folder, ("coreset",), 1, 1, "cifar10")
    print("CIFAR-shaped: seed 3 alone == seed 3 among five:", all(alone[k] == five[k] for k in alone))
    print("CIFAR-shaped: coreset alone == coreset among seven methods:", one["coreset/1"] == five["coreset/1"])


if __name__ == "__main__":
    main()

"""Training entry point of the ``regression_ddp`` package: data-parallel training on every rank.

The runtime starts one process per rank with torchrun's variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, ...) and calls, with the package root
(rank 0) or a copy of it (other ranks) as working directory:

- every rank: ``Main()``, ``train(training_directory)``: each rank trains on its shard of the
  rows (``rows[rank::world_size]``) and gradients are averaged across the ranks every step;
- rank 0 alone: ``evaluate(evaluation_directory)`` (full pipeline) and ``save()``.
- ``process_data(data_directory)`` (full pipeline) runs once per node, before the ranks.

With PyTorch installed this is ``DistributedDataParallel`` (NCCL on GPUs when each rank has one,
Gloo otherwise; CUDA when the run asks for a GPU). Without it, the same algorithm in plain
Python, with the gradients summed over TCP (``linear.TcpAllReduce``), so the package runs anywhere.

Hyperparameters (the run's ``env``): ``EPOCHS`` (default 300), ``LEARNING_RATE`` (default 0.05),
``BACKEND`` (``torch`` or ``python``; default: torch when importable).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import time
from pathlib import Path

try:  # progress and metrics for AI Center on Airflow (docs/progress.md); the package runs the same without it
    import aicenter
except ImportError:
    aicenter = None

from linear import MODEL_FILE, LinearModel, TcpAllReduce, distributed, r2, read_csv_dir, write_csv

EVALUATION_FRACTION = 0.2


def folder(name: str) -> Path:
    """An AI Center folder by its variable name (the runtime sets absolute paths)."""
    return Path(os.environ.get(name) or name.removesuffix("_directory"))


class Main:
    def __init__(self) -> None:
        self.epochs = int(os.environ.get("EPOCHS", "300"))
        self.learning_rate = float(os.environ.get("LEARNING_RATE", "0.05"))
        self.rank, self.world, self.master_addr, self.master_port = distributed()
        wanted = os.environ.get("BACKEND") or ("torch" if importlib.util.find_spec("torch") else "python")
        if wanted not in ("torch", "python"):
            raise ValueError(f"BACKEND={wanted!r}: use 'torch' or 'python'")
        self.backend = wanted
        # A previous version's weights (this version was trained before): training continues from them.
        self.model: LinearModel | None = LinearModel.load() if MODEL_FILE.exists() else None
        self.losses: list[float] = []
        self.summary: dict[str, object] = {}

    def process_data(self, input_directory: str) -> None:
        features, xs, ys = read_csv_dir(input_directory)
        rows = [[*x, y] for x, y in zip(xs, ys, strict=True)]
        random.Random(42).shuffle(rows)
        cut = max(1, int(len(rows) * (1 - EVALUATION_FRACTION)))
        header = [*features, "target"]
        write_csv(folder("training_data_directory") / "train.csv", header, rows[:cut])
        evaluation = folder("evaluation_data_directory")
        if not any(evaluation.rglob("*.csv")):  # an evaluation dataset, when given, is already there
            write_csv(evaluation / "evaluation.csv", header, rows[cut:])

    def train(self, training_directory: str) -> None:
        features, xs, ys = read_csv_dir(training_directory)
        shard_x, shard_y = xs[self.rank::self.world], ys[self.rank::self.world]
        if not shard_x:
            raise ValueError(f"rank {self.rank} got no rows: {len(xs)} rows for {self.world} ranks; use fewer processes")
        model = self.model if self.model and self.model.features == features else LinearModel(features)
        began = time.perf_counter()
        if self.backend == "torch":
            self.model = self._train_torch(model, shard_x, shard_y)
        else:
            self.model = self._train_python(model, shard_x, shard_y)
        took = time.perf_counter() - began
        self.summary.update(rank=self.rank, world_size=self.world, rows=len(shard_x), epochs=self.epochs,
                            seconds=round(took, 3), final_loss=self.losses[-1] if self.losses else None)
        artifacts = folder("artifacts_directory")
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / "train.json").write_text(json.dumps(self.summary, indent=2))
        print(f"rank {self.rank}/{self.world} ({self.summary.get('device', 'cpu')}, {self.backend}): "
              f"{self.epochs} epochs on {len(shard_x)} rows in {took:.2f} s, loss {self.summary['final_loss']:.6f}", flush=True)

    def _report(self, epoch: int, loss: float) -> None:
        """Rank 0 reports the epoch and its loss (the agent counts rank 0's reports only)."""
        if aicenter is not None and self.rank == 0:
            aicenter.report(step=epoch, total=self.epochs, loss=loss)

    def _train_python(self, model: LinearModel, xs: list[list[float]], ys: list[float]) -> LinearModel:
        reduce = TcpAllReduce(self.rank, self.world, self.master_addr, self.master_port) if self.world > 1 else None
        try:
            for epoch in range(1, self.epochs + 1):
                gw, gb, loss = model.gradient(xs, ys)
                local = [*gw, gb, loss, float(len(xs))]
                total = reduce.sum(local) if reduce else local
                n = total[-1]
                model.weights = [w - self.learning_rate * g / n for w, g in zip(model.weights, total[:len(gw)], strict=True)]
                model.bias -= self.learning_rate * total[len(gw)] / n
                self.losses.append(total[len(gw) + 1] / n)
                self._report(epoch, self.losses[-1])
        finally:
            if reduce:
                reduce.close()
        self.summary["device"] = "cpu"
        return model

    def _train_torch(self, model: LinearModel, xs: list[list[float]], ys: list[float]) -> LinearModel:
        import torch
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        gpus = torch.cuda.device_count() if int(os.environ.get("MA_NUM_GPUS", "0")) > 0 else 0
        device = torch.device("cuda", local_rank % gpus) if gpus else torch.device("cpu")
        if self.world > 1:
            # NCCL needs a GPU of its own per rank on a node; ranks sharing one GPU (or none) use Gloo.
            per_gpu = gpus >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            dist.init_process_group("nccl" if gpus and per_gpu else "gloo", init_method="env://")
        net = torch.nn.Linear(len(model.features), 1).to(device)
        with torch.no_grad():
            net.weight.copy_(torch.tensor([model.weights], device=device))
            net.bias.fill_(model.bias)
        trained = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if gpus else None) \
            if self.world > 1 else net
        x = torch.tensor(xs, dtype=torch.float32, device=device)
        y = torch.tensor(ys, dtype=torch.float32, device=device)
        optimiser = torch.optim.SGD(trained.parameters(), lr=self.learning_rate)
        losses = torch.empty(self.epochs, device=device)
        for epoch in range(self.epochs):
            optimiser.zero_grad()
            loss = torch.mean((trained(x).squeeze(1) - y) ** 2)
            loss.backward()  # DDP averages the gradients of all ranks here
            optimiser.step()
            losses[epoch] = loss.detach()
            if (epoch + 1) % max(1, self.epochs // 100) == 0 or epoch + 1 == self.epochs:  # .item() waits for the GPU
                self._report(epoch + 1, loss.item())
        self.losses = losses.tolist()
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        self.summary["device"] = str(device) + (f" ({torch.cuda.get_device_name(device)})" if gpus else "")
        return LinearModel(model.features, net.weight.detach().cpu()[0].tolist(), float(net.bias.detach().cpu()[0]))

    def evaluate(self, evaluation_directory: str) -> float:
        """R² on the evaluation split (1.0 is a perfect fit; higher is better)."""
        if self.model is None:
            raise RuntimeError("evaluate() needs a trained model: train first, or evaluate a trained version")
        features, xs, ys = read_csv_dir(evaluation_directory)
        if features != self.model.features:
            raise ValueError(f"evaluation columns {features} differ from the model's {self.model.features}")
        return float(r2(self.model, xs, ys))

    def save(self) -> None:
        if self.model is None:
            raise RuntimeError("save() needs a trained model: train first")
        self.model.save()

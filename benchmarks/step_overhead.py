"""How much does detr-train's training loop add over a bare PyTorch loop?

Both loops train the same tiny Deformable DETR on the same pre-collated batches; the
bare loop is forward / backward / step with nothing else. Passes over the batches
alternate between the two loops (A, B, A, B, ...) so machine noise hits both alike; the
step time of a pass is its duration over its number of steps. Printed: median step time
of each, their ratio (target <= 1.05), and the fraction of detr-train's step time spent
waiting for the DataLoader in a real epoch.

    python benchmarks/step_overhead.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from detr_train.config import config_dir
from detr_train.engine import EpochPlan, train_one_epoch
from detr_train.state import TrainState
from detr_train.trainer import Trainer


def _trainer(root: Path) -> Trainer:
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"data.root={root / 'data'}", "data.generate.num_train=64", "data.generate.num_val=8",
            "data.num_workers=1", "training.progress=false", "training.log_every=0",
        ])
    return Trainer(cfg, root / "run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(Path(tmp))
        trainer.train_sampler.set_epoch(1)
        batches = list(trainer.train_loader)
        bare_model = copy.deepcopy(trainer.model)
        bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-4)

        def bare_pass():
            bare_model.train()
            for batch in batches:
                out = bare_model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"],
                                 labels=batch["labels"])
                out.loss.backward()
                bare_opt.step()
                bare_opt.zero_grad(set_to_none=True)

        def our_pass():
            train_one_epoch(trainer.step, batches, TrainState(), EpochPlan(1, len(batches)), lambda: False)

        bare_times, our_times = [], []
        for round_index in range(args.rounds + 1):
            for one_pass, times in ((bare_pass, bare_times), (our_pass, our_times)):
                start = time.perf_counter()
                one_pass()
                if round_index > 0:  # the first round warms up
                    times.append((time.perf_counter() - start) / len(batches))
        bare, ours = statistics.median(bare_times), statistics.median(our_times)
        trainer.train_sampler.set_epoch(2)
        epoch = train_one_epoch(trainer.step, trainer.train_loader, TrainState(),
                                EpochPlan(2, trainer.steps_per_epoch), lambda: False)
    print(f"median step: bare loop {bare * 1000:.1f} ms, detr-train loop {ours * 1000:.1f} ms")
    print(f"ratio detr-train / bare: {ours / bare:.3f} (target <= 1.05)")
    print(f"data-wait fraction of a real epoch (1 worker): {epoch['data_wait_fraction']:.3f}")


if __name__ == "__main__":
    main()

"""How much does detr-train's training loop add over a bare PyTorch loop?

Both loops train the same tiny Deformable DETR on the same pre-collated batches; the
bare loop is forward / backward / step with nothing else. Passes over the batches
alternate between the two loops (A, B, A, B, ...) so machine noise hits both alike; the
step time of a pass is its duration over its number of steps. Printed: median step time
of each, their ratio (target <= 1.05), and the fraction of detr-train's step time spent
waiting for the DataLoader in a real epoch.

On CUDA the bare loop gets what the trainer has: a deep copy of the trainer's model (its
criterion, attention kernel and sync-free encoder come along), fused AdamW when the trainer
uses it, channels-last inputs when the trainer converts them, and each batch copied from
pinned memory with non_blocking, as the trainer's step does. The GPU is synchronised before
the clock is read, so a pass's time includes all of its GPU work.

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

from detr_train.checkpointing.plan import Plan
from detr_train.checkpointing.state import TrainState
from detr_train.config import config_dir
from detr_train.training.loop import EpochPlan, to_device, train_one_epoch
from detr_train.training.trainer import Trainer, trainer_for


def _trainer(root: Path) -> Trainer:
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"data.root={root / 'data'}", "data.generate.num_train=64", "data.generate.num_val=8",
            "data.num_workers=1", "training.progress=false", "training.log_every=0",
        ])
    # A new run without callbacks: only its steps are timed.
    return trainer_for(Plan(cfg, root / "run"))


def _pinned(batch: dict) -> dict:
    """The batch in page-locked memory, so that host-to-device copies can be asynchronous."""
    def pin(value):
        if isinstance(value, torch.Tensor):
            return value if value.is_pinned() else value.pin_memory()
        if isinstance(value, dict):
            return {key: pin(item) for key, item in value.items()}
        if isinstance(value, list):
            return [pin(item) for item in value]
        return value

    return pin(batch)


def _bare_model(trainer: Trainer) -> torch.nn.Module:
    model = copy.deepcopy(trainer.model)
    if trainer.fast_paths.compiled:
        # The deep copy's compiled call would still run the trainer's modules: compile the copy's own.
        model.model.backbone.compile()
        model.model.encoder.compile()
    return model


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(Path(tmp))
        device = trainer.device
        trainer.train_sampler.set_epoch(1)
        batches = list(trainer.train_loader)
        if device.type == "cuda":
            batches = [_pinned(batch) for batch in batches]
        bare_model = _bare_model(trainer)
        bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-4, fused=trainer.fast_paths.fused_optimizer or None)

        def bare_pass():
            bare_model.train()
            for batch in batches:
                pixel_values, pixel_mask, labels = to_device(batch, device,
                                                             channels_last=trainer.fast_paths.channels_last)
                out = bare_model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
                out.loss.backward()
                bare_opt.step()
                bare_opt.zero_grad(set_to_none=True)

        def our_pass():
            train_one_epoch(trainer.step, batches, TrainState(), EpochPlan(1, len(batches)), lambda: False)

        bare_times, our_times = [], []
        for round_index in range(args.rounds + 1):
            for one_pass, times in ((bare_pass, bare_times), (our_pass, our_times)):
                _synchronize(device)
                start = time.perf_counter()
                one_pass()
                _synchronize(device)
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

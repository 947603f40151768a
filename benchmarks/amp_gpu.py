"""AMP on CUDA: training-step throughput and peak memory of the R50 Deformable DETR.

Random init, 800 px inputs, the same batches for fp32, bf16 and fp16 (GradScaler), all
run through detr-train's own step code (`train_one_epoch`, deformable attention kept in
fp32). Printed as ratios to fp32; the seed design expects 1.5-2x speed and 30-50% less
memory. Needs a CUDA GPU; takes a few minutes.

    python benchmarks/amp_gpu.py [--batch-size 4] [--steps 20] [--size 800]
"""

from __future__ import annotations

import argparse
import time

import torch
from hydra import compose, initialize_config_dir

from detr_train.config_path import config_dir
from detr_train.engine import LossMeter, StepSettings, train_one_epoch
from detr_train.model import build_model
from detr_train.optim import build_optimizer
from detr_train.precision import keep_deformable_attention_fp32, resolve_precision


def _batches(n: int, batch_size: int, size: int, device) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        labels = []
        for _ in range(batch_size):
            k = 8
            centres = torch.rand(k, 2, generator=generator) * 0.8 + 0.1
            sizes = torch.rand(k, 2, generator=generator) * 0.1 + 0.02
            labels.append({"class_labels": torch.randint(0, 10, (k,), generator=generator).to(device),
                           "boxes": torch.cat([centres, sizes], dim=1).to(device)})
        batches.append({"pixel_values": torch.randn(batch_size, 3, size, int(size * 1.333), generator=generator).to(device),
                        "pixel_mask": torch.ones(batch_size, size, int(size * 1.333), dtype=torch.long).to(device),
                        "labels": labels})
    return batches


def measure(dtype_name: str | None, batches, args) -> tuple[float, float]:
    device = torch.device("cuda")
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["model=deformable_detr"])
    torch.manual_seed(0)
    model = build_model(cfg.model, [str(i) for i in range(10)]).to(device)
    precision = resolve_precision(dtype_name is not None, dtype_name or "bfloat16", device)
    if precision.enabled:
        keep_deformable_attention_fp32(model)
    optimizer = build_optimizer(model, cfg.training)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    settings = StepSettings(grad_clip=0.1, nonfinite="skip", max_nonfinite_steps=1000, log_every=0, progress=False)
    train_one_epoch(model, batches[:3], optimizer, scheduler, precision, device, settings, LossMeter(), epoch=0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_one_epoch(model, batches, optimizer, scheduler, precision, device, settings, LossMeter(), epoch=1)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    images_per_s = len(batches) * args.batch_size / elapsed
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    del model, optimizer
    torch.cuda.empty_cache()
    return images_per_s, peak_gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=800)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("amp_gpu.py needs a CUDA GPU")
    batches = _batches(args.steps, args.batch_size, args.size, torch.device("cuda"))
    results = {name: measure(dtype, batches, args) for name, dtype in (("fp32", None), ("bf16", "bfloat16"), ("fp16", "float16"))}
    base_speed, base_mem = results["fp32"]
    print(f"GPU: {torch.cuda.get_device_name()}, R50 Deformable DETR, batch {args.batch_size}, "
          f"{args.size}x{int(args.size * 1.333)} px, {args.steps} timed steps")
    for name, (speed, memory) in results.items():
        print(f"{name}: {speed:6.1f} img/s ({speed / base_speed:.2f}x fp32), peak {memory:5.2f} GiB "
              f"({memory / base_mem:.2f}x fp32)")


if __name__ == "__main__":
    main()

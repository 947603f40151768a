"""DDP under torchrun: two CPU processes (gloo) train in lockstep and rank 0 alone writes."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from detr_train.checkpointing import format as ckpt
from detr_train.checkpointing.plan import Plan
from detr_train.data.sampling import EpochBatchSampler
from detr_train.evaluation.coco import load_coco_ground_truth, score_detections
from tests.conftest import REPO_ROOT, compose_config, make_trainer, run_cli

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _noisy_detections(coco_gt, seed: int) -> list[dict]:
    """Jittered ground truth plus false positives, every score distinct."""
    rng = random.Random(seed)
    detections = []
    for ann in coco_gt.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        jitter = [x + rng.uniform(-3, 3), y + rng.uniform(-3, 3), w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
        detections.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": jitter})
    category_ids = coco_gt.getCatIds()
    for image_id in coco_gt.getImgIds():
        for _ in range(3):
            box = [rng.uniform(0, 60), rng.uniform(0, 60), rng.uniform(5, 30), rng.uniform(5, 30)]
            detections.append({"image_id": image_id, "category_id": rng.choice(category_ids), "bbox": box})
    scores = rng.sample(range(1, 10 * len(detections)), len(detections))
    for detection, score in zip(detections, scores):
        detection["score"] = score / (10 * len(detections))
    return detections


def _gathered_eval_worker(rank: int, world_size: int, port: int, val_ann: str, out: str) -> None:
    import torch.distributed as dist

    from detr_train.distributed.launch import DistContext
    from detr_train.evaluation.coco import gathered_scores

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        coco_gt = load_coco_ground_truth(Path(val_ann))
        image_ids = sorted(coco_gt.getImgIds())
        # Each rank holds the detections of its strided share of the images, as the val sampler gives it.
        mine = set(image_ids[rank::world_size])
        local = [d for d in _noisy_detections(coco_gt, seed=7) if d["image_id"] in mine]
        metrics = gathered_scores(coco_gt, local, image_ids, DistContext(rank, world_size, rank)).metrics
        Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def test_gathered_evaluation_equals_a_single_process_evaluation(synthetic_root, tmp_path):
    val_ann = synthetic_root / "annotations" / "val.json"
    mp.spawn(_gathered_eval_worker, args=(2, _free_port(), str(val_ann), str(tmp_path)), nprocs=2, join=True)
    coco_gt = load_coco_ground_truth(val_ann)
    single = score_detections(coco_gt, _noisy_detections(coco_gt, seed=7), sorted(coco_gt.getImgIds())).metrics
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert 0.1 < single["map"] < 0.95  # a real, non-degenerate score
    assert rank0 == json.loads(json.dumps(single))
    assert rank1 == rank0  # every rank gets the metrics, so pruning and "best" agree


def _divergence_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from detr_train.distributed.collectives import DistContext, ReplicaDivergenceError, check_replicas

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        ctx = DistContext(rank, world_size, rank)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        check_replicas(model, ctx, step=1)  # identical: passes
        if rank == 1:
            with torch.no_grad():
                model.bias[0] += 1e-6
        try:
            check_replicas(model, ctx, step=2)
            outcome = "passed"
        except ReplicaDivergenceError as error:
            outcome = str(error)
        Path(out, f"rank{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_diverged_replicas_are_reported_on_every_rank(tmp_path):
    mp.spawn(_divergence_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith("DDP replicas diverged at step 2")


@pytest.mark.parametrize("world_size,batch_size,batches_done", [(2, 4, 3), (2, 3, 5), (3, 2, 4)])
def test_batches_on_n_ranks_use_the_same_images_as_on_one(world_size, batch_size, batches_done):
    """What lets a checkpoint written by N processes resume in 1: the same images are used up."""
    order = EpochBatchSampler(100, batch_size, shuffle=True, seed=3, size_for_epoch=lambda e: 96)
    order.set_epoch(2)
    single = [r.index for batch in order for r in batch]
    used = set()
    for rank in range(world_size):
        sampler = EpochBatchSampler(100, batch_size, shuffle=True, seed=3, size_for_epoch=lambda e: 96,
                                    rank=rank, world_size=world_size)
        sampler.set_epoch(2)
        batches = list(sampler)[:batches_done]
        used |= {r.index for batch in batches for r in batch}
    assert used == set(single[: batches_done * batch_size * world_size])


def test_unpadded_evaluation_shards_cover_every_image_once():
    shards = []
    for rank in range(3):
        sampler = EpochBatchSampler(10, 4, shuffle=False, seed=0, size_for_epoch=lambda e: 96,
                                    rank=rank, world_size=3, pad=False)
        shards.append([r.index for batch in sampler for r in batch])
    assert sorted(i for shard in shards for i in shard) == list(range(10))


@pytest.fixture(scope="module")
def two_process_run(synthetic_root, tmp_path_factory):
    """`torchrun --nproc_per_node=2 -m detr_train`, 2 epochs on CPU, parameters compared after every step."""
    work = tmp_path_factory.mktemp("ddp")
    from tests.conftest import SMALL_SYNTHETIC

    overrides = SMALL_SYNTHETIC + [
        f"data.root={synthetic_root}", f"output_root={work / 'outputs'}", "name=ddp",
        "training.batch_size=4", "training.epochs=2", "training.log_every=0", "training.progress=false",
        "training.schedule.warmup_steps=2", "training.ddp.check_replicas_every=1",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([*torchrun, "-m", "detr_train", *overrides], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return work, overrides, result


def test_two_ranks_hold_identical_parameters_after_every_step(two_process_run):
    work, _, result = two_process_run
    (run_dir,) = (work / "outputs" / "ddp").iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = records[-1]["global_step"]
    # 48 images over 2 ranks at 4 per rank: 6 steps per epoch.
    assert steps == 12
    log_text = (run_dir / "train.log").read_text()
    checked = [line for line in log_text.splitlines() if "parameters identical on all 2 ranks" in line]
    assert len(checked) == steps
    saved = ckpt.train_state_of(ckpt.load_checkpoint(run_dir / "checkpoints" / "last.pt"))
    assert saved["world_size"] == 2 and saved["effective_batch_size"] == 8


def test_rank_zero_alone_writes_one_run_directory(two_process_run):
    work, _, _ = two_process_run
    assert sorted(p.name for p in work.iterdir()) == ["outputs"]
    (run_dir,) = (work / "outputs" / "ddp").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "checkpoints", "data_report.json", "metrics.jsonl",
                                                         "plots", "train.log", "training_curves.png"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert (run_dir / "train.log").read_text().count("epoch 2/2:") == 1


def test_the_sharded_evaluation_matches_one_process_evaluating_the_same_weights(two_process_run):

    work, overrides, _ = two_process_run
    (run_dir,) = (work / "outputs" / "ddp").iterdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trainer = make_trainer(Plan(compose_config(overrides), work / "single_eval"))
    trainer.model.load_state_dict(ckpt.load_checkpoint(run_dir / "checkpoints" / "last.pt")[ckpt.STATE_MODEL])
    metrics = trainer.evaluate().metrics
    # Other batch compositions change the float sums in the last bits only.
    assert metrics["map"] == pytest.approx(records[-1]["map"], abs=1e-4)
    assert metrics["map_50"] == pytest.approx(records[-1]["map_50"], abs=1e-4)


def test_eval_under_torchrun_scores_the_shards_together_as_training_did(two_process_run, tmp_path):
    work, _, _ = two_process_run
    (run_dir,) = (work / "outputs" / "ddp").iterdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    output = tmp_path / "scores"
    result = subprocess.run([*torchrun, "-m", "detr_train.cli.evaluate", str(run_dir), "--output", str(output)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((output / "metrics.json").read_text())
    # The same two shards in the same batches as training's evaluation: the same numbers.
    assert report["metrics"]["map"] == pytest.approx(records[-1]["map"], abs=1e-6)
    assert report["images"] == 16  # every validation image once, from both shards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"]


def test_a_two_process_checkpoint_resumes_in_one_process(two_process_run, tmp_path):
    work, overrides, _ = two_process_run
    (original,) = (work / "outputs" / "ddp").iterdir()
    run_dir = tmp_path / "copy"
    shutil.copytree(original, run_dir)
    result = run_cli(overrides + [f"training.resume={run_dir}", "training.epochs=3"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log_text = (run_dir / "train.log").read_text()
    assert "the checkpoint was written by 2 process(es) (effective batch 8), this run has 1 (effective batch 4)" in log_text
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    # Epoch 3 on one process: 12 steps, after the schedule was moved to 2 epochs x 12 steps.
    assert records[-1]["global_step"] == 36
    saved = ckpt.train_state_of(ckpt.load_checkpoint(run_dir / "checkpoints" / "last.pt"))
    assert saved["world_size"] == 1 and saved["effective_batch_size"] == 4


def test_torchrun_refuses_a_search_trial(synthetic_root, tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    # Rank 0 fails before any collective, so it needs no partner process.
    result = subprocess.run(
        [sys.executable, "-m", "detr_train", f"output_root={tmp_path}", "trial.number=0", "trial.study_name=s",
         "trial.storage=x", "training.device=cpu"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "a search trial cannot run under torchrun" in result.stdout + result.stderr

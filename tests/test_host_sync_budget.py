"""The host-sync budget of a training step, held on the CPU (DESIGN pitfalls 9 and 15).

`tests/host_syncs.py` counts what would block the host on a GPU; the R50 tests run one real
Trainer step through it, with the fast paths and with transformers' own loss and encoder
layers. A failure prints the table of syncs, so a regression names the line that added one.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tests.host_syncs import HostSyncCounter, SyncReport, count_host_syncs, fast_and_stock_syncs

# The fast path syncs 3 times: the criterion's one matching readback, the step's one read of
# its loss values, and transformers' upload of the feature-map shapes in the model's forward.
# The budget leaves room for one more, the target the project holds on a GPU being <= 10.
FAST_PATH_BUDGET = 4
DEVICE = torch.device("cpu")
THIS_FILE = "tests/test_host_sync_budget.py"


def this_line() -> int:
    return sys._getframe(1).f_lineno


def kinds(report: SyncReport) -> list[str]:
    return sorted(kind for row in report.rows for kind in [row.kind] * row.count)


# --- the counter on hand-written code ----------------------------------------------------


def test_a_scalar_read_of_device_data_is_counted_once_at_its_line():
    x = torch.randn(4)
    line = this_line() + 1
    _, report = count_host_syncs(lambda: x.sum().item(), DEVICE, [x])
    assert [(row.location, row.kind, row.count) for row in report.rows] == [(f"{THIS_FILE}:{line}", "item", 1)]
    assert report.total == 1


def test_reading_host_tensors_costs_nothing():
    host = torch.randn(4)

    def reads():
        host.tolist(), host.sum().item(), bool((host > 0).all()), host.cpu().numpy(), host[host > 0]

    assert count_host_syncs(reads, DEVICE)[1].total == 0


def test_each_read_of_device_data_is_counted_once():
    x = torch.randn(5)

    def reads():
        x.cpu().numpy()  # one copy to the host; numpy() of that host copy is free
        x.tolist()
        if (x > 0).all():
            pass
        x[x > 0]
        torch.nonzero(x)
        np.asarray(x)
        x.to("cpu")

    _, report = count_host_syncs(reads, DEVICE, [x])
    assert kinds(report) == sorted([
        "cpu", "tolist", "bool", "bool-mask index", "nonzero", "__array__", ".to(host) D2H"])


def test_blocking_uploads_are_counted_and_make_device_tensors():
    host = torch.tensor([0, 1])
    x = torch.randn(5)

    def uploads():
        torch.as_tensor([1, 2], device=DEVICE)
        torch.tensor(3.0, device=DEVICE)
        index = host.to(DEVICE)
        x[index]  # a device index: free
        x[host]  # a host index is copied to the device first
        return index

    index, report = count_host_syncs(uploads, DEVICE, [x])
    assert kinds(report) == sorted([
        "as_tensor(host data) H2D", "tensor(host data) H2D", ".to(device) H2D", "host index H2D"])
    assert report.total == 4


def test_non_blocking_copies_and_device_factories_are_free_and_their_tensors_live_on_the_device():
    host = torch.randn(3)
    counter = HostSyncCounter(DEVICE)
    with counter.counting():
        moved = host.to(DEVICE, non_blocking=True)
        made = torch.zeros(3, device=DEVICE)
        on_host = torch.zeros(3)
        moved[moved > 0] = 0  # a host scalar into a mask: masked_fill_, no sync
    assert counter.report().total == 0
    assert counter.is_resident(moved) and counter.is_resident(made)
    assert not counter.is_resident(host) and not counter.is_resident(on_host)


def test_checks_only_the_cpu_makes_are_free_but_data_dependent_sizes_are_not():
    labels = torch.tensor([0, 2, 1])

    def ops():
        torch.nn.functional.one_hot(labels, 3)  # CUDA leaves the range check to the device
        torch.nn.functional.one_hot(labels)  # the class count is read from the data
        torch.repeat_interleave(labels)
        torch.repeat_interleave(labels, output_size=3)
        labels.unique()

    _, report = count_host_syncs(ops, DEVICE, [labels])
    assert kinds(report) == sorted(["one_hot without num_classes", "repeat_interleave", "unique"])


def test_gradients_of_device_parameters_live_on_the_device():
    layer = torch.nn.Linear(3, 2)
    counter = HostSyncCounter(DEVICE)
    counter.mark_resident(layer.parameters())
    with counter.counting():
        layer(torch.randn(4, 3)).square().sum().backward()
        line = this_line() + 1
        norm = layer.weight.grad.norm().item()
    assert all(counter.is_resident(param.grad) for param in layer.parameters())
    assert [(row.location, row.kind) for row in counter.report().rows] == [(f"{THIS_FILE}:{line}", "item")]
    assert norm > 0


def test_the_table_names_every_location_and_the_total():
    x = torch.randn(3)

    def reads():
        for _ in range(3):
            x.sum().item()
        x.tolist()

    _, report = count_host_syncs(reads, DEVICE, [x])
    table = report.table()
    assert table.splitlines()[0].split() == ["location", "kind", "count"]
    assert f"{THIS_FILE}:" in table and "tolist" in table
    assert table.splitlines()[-1] == "total: 4 host syncs"
    assert report.rows[0].count == 3  # the most frequent first


# --- one R50 training step ---------------------------------------------------------------


@pytest.fixture(scope="module")
def r50_step_syncs(tmp_path_factory) -> tuple[SyncReport, SyncReport]:
    return fast_and_stock_syncs(tmp_path_factory.mktemp("host_syncs"))


@pytest.mark.slow
def test_the_fast_path_training_step_stays_within_its_sync_budget(r50_step_syncs):
    fast, _ = r50_step_syncs
    print(f"\nR50 training step with the fast paths:\n{fast.table()}")
    assert fast.total <= FAST_PATH_BUDGET, (
        f"{fast.total} host syncs in one fast-path training step (budget {FAST_PATH_BUDGET}):\n{fast.table()}")
    # The step's one deliberate read: its loss values, all at once.
    assert any(row.location.startswith("detr_train/training/loop.py:") and row.kind == "tolist" for row in fast.rows)


@pytest.mark.slow
def test_transformers_loss_and_encoder_layers_sync_many_times_more(r50_step_syncs):
    fast, stock = r50_step_syncs
    print(f"\nR50 training step with transformers' loss and encoder layers:\n{stock.table(limit=15)}")
    assert stock.total > 20 and stock.total > 5 * fast.total, stock.table()
    # The known culprits (DESIGN pitfall 9) are among them.
    where = {(row.location.rsplit(":", 1)[0], row.kind) for row in stock.rows}
    assert ("transformers/loss/loss_deformable_detr.py", "cpu") in where  # the matcher, per decoder layer
    assert ("transformers/loss/loss_for_object_detection.py", "item") in where  # num_boxes
    assert ("transformers/models/deformable_detr/modeling_deformable_detr.py", "bool") in where  # isfinite

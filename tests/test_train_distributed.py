"""slimops.train under DistributedDataParallel: two CPU processes (gloo) against one process.

What "the same global batch" means here. Two ranks each take one half (``B / 2`` samples)
of a global batch of ``B``; DDP averages their gradients, so with mean losses the update is
that of the mean loss over the global batch, with one difference: BN in training mode
normalises each rank's half with that half's own statistics (DDP without
``SyncBatchNorm``), which full-batch BN would not. So the single-process reference does
exactly what the two ranks do together, in one process: ``PerShard`` runs the model on
each half of the global batch separately (its own batch statistics, and its own copy of the
BN running statistics, as each rank keeps its own) and concatenates the outputs; the mean
loss over the concatenation is the mean of the two halves' mean losses. The reference then
trains with the plain, non-distributed ``slimmable_step`` / ``Trainer`` on the global
batches. Everything is float64 on one thread, so the two agree to round-off (DDP divides
each rank's gradient by 2 before summing; the reference sums per-sample terms divided by 8).

Why the checks are strong enough. ``slimmable_step`` runs every width but the smallest
under ``ddp.no_sync()``; the largest width's private BN γ/β (``*.bn.bn.2.*``) get gradients
only in that first, unsynchronised pass. If DDP did not average them at the final backward,
each rank would step them with its own half's gradient: the ranks would disagree with each
other and with the reference. The tests compare every parameter, pick those γ/β out
explicitly, and check that training on one half alone moves them elsewhere.

One spawn runs every scenario (``_worker``), each rank saving what it ends with under a
temporary folder; the tests below compare those files with single-process runs. The
process group uses a ``FileStore`` in that folder and the loopback interface only.
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import slimops.train.distributed as train_mod
from slimops.models import slim_cnn
from slimops.train import (
    RANDOM_WIDTHS,
    Trainer,
    average_buffers,
    calibrate_bn,
    param_groups,
    slimmable_step,
    wrap_distributed,
)
from slimops.width import get_width, set_width
from slimops.width import width as width_scope

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)

WORLD = 2
SHARD = 4  # samples per rank per step; the global batch is WORLD * SHARD
STEPS = 3
WIDTHS = (0.25, 0.5, 1.0)
WIDTHS4 = (0.25, 0.5, 0.75, 1.0)
EXACT = dict(rtol=1e-10, atol=1e-12)  # float64: only the reduction order differs
LARGEST_ONLY = ".bn.bn.2."  # in a name: the 1.0x width's private BN γ/β (widths ascend)


def tiny(widths=WIDTHS, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return slim_cnn(widths=widths, num_classes=4, in_channels=1, base=(8, 16, 32)).double()


def global_batches(steps=STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = WORLD * SHARD
    return [(torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (n,), generator=g)) for _ in range(steps)]


def shard(batch, rank):
    x, y = batch
    return x[rank * SHARD:(rank + 1) * SHARD], y[rank * SHARD:(rank + 1) * SHARD]


def sgd(model):
    return torch.optim.SGD(param_groups(model, 1e-3), lr=0.1, momentum=0.9)


def trainer_data():
    g = torch.Generator().manual_seed(5)
    train = TensorDataset(torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64),
                          torch.randint(0, 4, (16,), generator=g))
    val = TensorDataset(torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64),
                        torch.randint(0, 4, (8,), generator=g))
    return train, val


def calibration_batches(rank):
    """Unequal counts (rank 0: two batches, rank 1: one) to check the weighted merge."""
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(SHARD, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    return batches[:2] if rank == 0 else batches[2:]


def make_trainer(model, seed):
    optimizer = sgd(model)
    return Trainer(model, optimizer, scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5),
                   sandwich=1, inplace_distillation=True, seed=seed, progress=False)


# --------------------------------------------------------------------------- the ranks


def _loopback_interface():
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in names if n == "lo" or n.startswith("lo")), None)


def _worker(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    lo = _loopback_interface()
    if lo is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)  # 127.0.0.1 only
    store = dist.FileStore(os.path.join(out, "store"), WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {"rank": rank}
        _scenario_settings(rank, results)
        _scenario_algorithm1(rank, results)
        _scenario_subset_distillation(rank, results)
        _scenario_trainer(rank, out, results)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _scenario_settings(rank, results):
    """Refused DDP settings; width switching through the wrapper; init-time buffer sync."""
    model = tiny()
    with pytest.raises(ValueError, match="find_unused_parameters"):
        wrap_distributed(model, find_unused_parameters=False)
    with pytest.raises(ValueError, match="static_graph"):
        wrap_distributed(model, static_graph=True)
    plain = nn.parallel.DistributedDataParallel(tiny())  # find_unused_parameters=False
    x, y = shard(global_batches(1)[0], rank)
    with pytest.raises(ValueError, match="find_unused_parameters=True"):
        slimmable_step(plain, x, y, nn.CrossEntropyLoss(), sgd(plain))
    with pytest.raises(ValueError, match="find_unused_parameters=True"):
        Trainer(plain, sgd(plain))

    # Rank-dependent buffers become rank 0's at wrapping time, on both DDP code paths.
    for has_forward_sync in (True, False):
        m = tiny()
        with torch.no_grad():
            for b in m.buffers():
                if b.is_floating_point():
                    b.fill_(rank + 2.0)
        saved = train_mod._HAS_FORWARD_SYNC_BUFFERS
        train_mod._HAS_FORWARD_SYNC_BUFFERS = has_forward_sync
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # broadcast_buffers (torch 2.13)
                ddp = wrap_distributed(m)
        finally:
            train_mod._HAS_FORWARD_SYNC_BUFFERS = saved
        assert ddp.find_unused_parameters and not ddp.static_graph
        assert all(bool((b == 2.0).all()) for b in m.buffers() if b.is_floating_point())
        with pytest.raises(TypeError, match="already"):
            wrap_distributed(ddp)

    # Width switching through the wrapper reaches the wrapped module's layers.
    m = tiny()
    ddp = wrap_distributed(m).eval()
    with torch.no_grad():
        outputs = {}
        for w in WIDTHS:
            with width_scope(ddp, w):
                assert get_width(m) == w
                outputs[w] = ddp(x)
            with width_scope(m, w):
                assert torch.equal(outputs[w], m(x))
        assert torch.equal(outputs[1.0], ddp(x))  # the default width
        assert not torch.equal(outputs[0.25], outputs[1.0])
    set_width(ddp, 0.5)
    assert get_width(m) == 0.5
    set_width(ddp, 1.0)
    results["settings"] = True


def _scenario_algorithm1(rank, results):
    """Algorithm 1 (all widths, largest first) for STEPS steps on this rank's halves."""
    model = tiny()
    ddp = wrap_distributed(model).train()
    optimizer = sgd(ddp)
    losses = []
    for batch in global_batches():
        x, y = shard(batch, rank)
        losses.append(slimmable_step(ddp, x, y, nn.CrossEntropyLoss(), optimizer))
    results["alg1"] = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},  # this rank's
        "losses": losses,
    }
    average_buffers(ddp)
    results["alg1"]["averaged"] = {n: b.clone() for n, b in model.named_buffers()}

    # BN calibration merges the ranks' statistics, weighted by their batch counts.
    calibrate_bn(ddp, calibration_batches(rank), num_batches=None)
    results["alg1"]["calibrated"] = {n: b.clone() for n, b in model.named_buffers()}


def _scenario_subset_distillation(rank, results):
    """Two of three widths with in-place distillation: the 0.5x BN is used by no pass on
    any rank and must keep ``grad is None`` (DDP leaves globally unused parameters alone)."""
    model = tiny()
    ddp = wrap_distributed(model).train()
    optimizer = sgd(ddp)
    for batch in global_batches(seed=2):
        x, y = shard(batch, rank)
        slimmable_step(ddp, x, y, nn.CrossEntropyLoss(), optimizer, widths=[0.25, 1.0],
                       inplace_distillation=True)
        unused = [n for n, p in model.named_parameters() if ".bn.bn.1." in n]
        assert unused and all(model.get_parameter(n).grad is None for n in unused)
    results["subset"] = {n: p.detach().clone() for n, p in model.named_parameters()}


def _scenario_trainer(rank, out, results):
    """``Trainer`` on a DDP model: DistributedSampler loaders, the sandwich rule with
    rank-dependent seeds (rank 0's generator must win), per-epoch scheduler, evaluation,
    buffer averaging, a checkpoint written by rank 0 only and loaded by every rank."""
    train, val = trainer_data()
    sampler = DistributedSampler(train, shuffle=True, seed=3)
    loader = DataLoader(train, batch_size=SHARD, sampler=sampler)
    val_loader = DataLoader(val, batch_size=SHARD, sampler=DistributedSampler(val, shuffle=False))
    model = tiny(WIDTHS4)
    trainer = make_trainer(wrap_distributed(model), seed=10 + rank)
    assert (trainer.rank, trainer.world_size) == (rank, WORLD) and trainer.module is model
    trainer.fit(loader, 2, val_loader)
    path = os.path.join(out, "ckpt", "trainer.pt")
    saves, real_save = [], torch.save
    torch.save = lambda *a, **k: (saves.append(a[1]), real_save(*a, **k))[1]
    try:
        trainer.save_checkpoint(path)
    finally:
        torch.save = real_save
    dist.barrier()
    resumed = make_trainer(wrap_distributed(tiny(WIDTHS4, seed=99)), seed=0)
    assert resumed.load_checkpoint(path) == 2
    results["trainer"] = {
        "resumed": {n: t.clone() for n, t in resumed.module.state_dict().items()},
        "history": trainer.history,
        "state": {n: t.clone() for n, t in model.state_dict().items()},
        "generator": trainer.generator.get_state(),
        "scheduler": trainer.scheduler.state_dict(),
        "global_step": trainer.global_step,
        "saves": len(saves),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run every scenario on 2 gloo processes; each rank's results, by rank."""
    out = tmp_path_factory.mktemp("ddp")
    (out / "ckpt").mkdir()
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    loaded = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [r["rank"] for r in loaded] == list(range(WORLD))
    return loaded, out


# --------------------------------------------------------------------------- the reference


class PerShard(nn.Module):
    """``model`` run on each of ``n`` equal, contiguous parts of the batch separately, each
    part with its own copy of the buffers (BN running statistics): what ``n`` DDP ranks do,
    in one process. Outputs are concatenated in order. Eval mode runs the whole batch with
    the buffers last bound (``average_buffers`` binds the mean of the copies)."""

    def __init__(self, model: nn.Module, n: int = WORLD) -> None:
        super().__init__()
        self.model = model
        self.n = n
        self.copies = [{k: b.clone() for k, b in model.named_buffers()} for _ in range(n)]

    def _bind(self, buffers):
        # Rebinding, not copying: the tensors a pass saved for backward stay untouched.
        for name, t in buffers.items():
            owner, _, attr = name.rpartition(".")
            self.model.get_submodule(owner)._buffers[attr] = t

    def forward(self, x):
        if not self.training:
            return self.model(x)
        outs = []
        for part, buffers in zip(x.chunk(self.n), self.copies):
            self._bind(buffers)
            outs.append(self.model(part))
        return torch.cat(outs)

    def average_buffers(self):
        mean = {k: (torch.stack([c[k] for c in self.copies]).mean(0) if v.is_floating_point()
                    else v.clone()) for k, v in self.copies[0].items()}
        self.copies = [{k: v.clone() for k, v in mean.items()} for _ in range(self.n)]
        self._bind(mean)


class GlobalLoader:
    """The reference's loader: batch ``k`` of epoch ``e`` is rank 0's batch ``k`` followed by
    rank 1's, as the ranks' ``DistributedSampler`` loaders give them after ``set_epoch(e)``
    (which the DDP ``Trainer`` must call; this loader counts its epochs itself). When an
    epoch's batches run out it averages the ``PerShard`` buffer copies, where the DDP
    ``Trainer`` averages the ranks' buffers."""

    def __init__(self, dataset, sharded: PerShard) -> None:
        self.samplers = [DistributedSampler(dataset, num_replicas=WORLD, rank=r, shuffle=True,
                                            seed=3) for r in range(WORLD)]
        self.dataset, self.sharded, self.epoch = dataset, sharded, 0

    def __len__(self):
        return len(self.samplers[0]) // SHARD

    def __iter__(self):
        for s in self.samplers:
            s.set_epoch(self.epoch)
        indices = [list(s) for s in self.samplers]
        for k in range(0, len(indices[0]), SHARD):
            parts = [self.dataset[idx[k:k + SHARD]] for idx in indices]
            yield torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        self.sharded.average_buffers()
        self.epoch += 1


def reference_algorithm1(batches=None, only_rank=None):
    """Single-process Algorithm 1 on the global batches (``only_rank``: on that half only)."""
    model = tiny().train()
    net = PerShard(model) if only_rank is None else model
    optimizer = sgd(model)
    losses = []
    for batch in batches or global_batches():
        x, y = batch if only_rank is None else shard(batch, only_rank)
        losses.append(slimmable_step(net, x, y, nn.CrossEntropyLoss(), optimizer))
    return model, net, losses


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


# --------------------------------------------------------------------------- the tests


def test_refused_settings_width_switching_and_buffer_sync(ranks):
    results, _ = ranks
    assert all(r["settings"] for r in results)  # the checks ran (and passed) in each rank


def test_algorithm1_equals_single_process_on_the_global_batch(ranks):
    results, _ = ranks
    model, ref, ref_losses = reference_algorithm1()
    expected = dict(model.named_parameters())
    for r in results:
        got = r["alg1"]["params"]
        assert got.keys() == expected.keys()
        for n in expected:
            torch.testing.assert_close(got[n], expected[n].detach(), **EXACT, msg=n)
        # each rank's losses are its half's; their mean is the global batch's
    for step, ref_step in enumerate(ref_losses):
        assert list(ref_step) == [1.0, 0.5, 0.25]
        for w, v in ref_step.items():
            mean = sum(r["alg1"]["losses"][step][w] for r in results) / WORLD
            assert mean == pytest.approx(v, rel=1e-12)
    a, b = (r["alg1"]["params"] for r in results)
    assert all(torch.equal(a[n], b[n]) for n in a)  # the ranks hold the same weights

    # The largest width's private BN parameters (gradients only in the first, no_sync
    # pass) trained, and to the average: on one half alone they end elsewhere.
    # Both margins are over 1e6 times the tolerance.
    init = dict(tiny().named_parameters())
    largest_only = [n for n in expected if LARGEST_ONLY in n]
    assert len(largest_only) == 2 * 7  # γ and β of the stem's and the blocks' 6 BNs
    for half in range(WORLD):
        alone = dict(reference_algorithm1(only_rank=half)[0].named_parameters())
        for n in largest_only:
            assert float((expected[n] - init[n]).detach().abs().max()) > 1e-5, n
            assert float((alone[n] - expected[n]).detach().abs().max()) > 1e-5, (half, n)


def test_bn_running_stats_are_per_rank_until_averaged(ranks):
    results, _ = ranks
    _, ref, _ = reference_algorithm1()
    for rank, r in enumerate(results):  # rank r's statistics are those of half r
        for n, b in ref.copies[rank].items():
            torch.testing.assert_close(r["alg1"]["buffers"][n], b, **EXACT, msg=n)
    a, b = (r["alg1"]["buffers"] for r in results)
    assert not torch.equal(a["stem.bn.bn.2.running_mean"], b["stem.bn.bn.2.running_mean"])
    ref.average_buffers()
    for r in results:
        for n, b in ref.model.named_buffers():
            torch.testing.assert_close(r["alg1"]["averaged"][n], b, **EXACT, msg=n)


def test_calibrate_bn_merges_ranks_like_one_process_over_all_batches(ranks):
    results, _ = ranks
    model, _, _ = reference_algorithm1()
    calibrate_bn(model, calibration_batches(0) + calibration_batches(1), num_batches=None)
    for r in results:
        for n, b in model.named_buffers():
            torch.testing.assert_close(r["alg1"]["calibrated"][n], b, **EXACT, msg=n)
    assert int(model.stem.bn.bn[0].num_batches_tracked) == 3


def test_unused_width_and_inplace_distillation_equal_single_process(ranks):
    results, _ = ranks
    model = tiny().train()
    net = PerShard(model)
    optimizer = sgd(model)
    for x, y in global_batches(seed=2):
        slimmable_step(net, x, y, nn.CrossEntropyLoss(), optimizer, widths=[0.25, 1.0],
                       inplace_distillation=True)
    init = dict(tiny().named_parameters())
    for r in results:
        for n, p in model.named_parameters():
            torch.testing.assert_close(r["subset"][n], p.detach(), **EXACT, msg=n)
            if ".bn.bn.1." in n:  # never used: untouched (no weight decay on BN)
                assert torch.equal(r["subset"][n], init[n].detach()), n


def test_trainer_equals_single_process_and_checkpoints_from_rank0(ranks):
    results, out = ranks
    train, val = trainer_data()
    model = tiny(WIDTHS4)
    net = PerShard(model)
    ref = make_trainer(net, seed=10)  # rank 0's seed: the ranks use rank 0's generator
    ref.fit(GlobalLoader(train, net), 2, [val.tensors])

    for r in results:
        t = r["trainer"]
        assert t["global_step"] == ref.global_step == 4
        assert t["scheduler"] == ref.scheduler.state_dict()
        assert torch.equal(t["generator"], ref.generator.get_state())
        assert len(t["history"]) == 2
        for got, want in zip(t["history"], ref.history):
            assert got["epoch"] == want["epoch"]
            assert got["val_acc"] == want["val_acc"]
            assert list(got["train_loss"]) == list(want["train_loss"])
            for w in want["train_loss"]:
                assert got["train_loss"][w] == pytest.approx(want["train_loss"][w], rel=1e-10)
        for n, v in model.state_dict().items():
            torch.testing.assert_close(t["state"][n], v, **EXACT, msg=n)
    # the sandwich rule drew random widths between the switches (slim_cnn is built from
    # channel rules), the same on both ranks: the weights above agree
    assert all(list(e["train_loss"]) == [1.0, 0.25, RANDOM_WIDTHS] for e in ref.history)

    assert [r["trainer"]["saves"] for r in results] == [1, 0]  # only rank 0 writes
    assert sorted(os.listdir(out / "ckpt")) == ["trainer.pt"]
    ckpt = torch.load(out / "ckpt" / "trainer.pt", weights_only=True)
    assert ckpt["model"].keys() == model.state_dict().keys()  # no "module." prefix
    for n, v in ckpt["model"].items():
        assert torch.equal(v, results[0]["trainer"]["state"][n]), n
        for r in results:  # every rank loaded rank 0's checkpoint
            assert torch.equal(v, r["trainer"]["resumed"][n]), n
    plain = make_trainer(tiny(WIDTHS4, seed=5), seed=0)
    assert plain.load_checkpoint(out / "ckpt" / "trainer.pt") == 2  # loads unwrapped


def test_wrap_distributed_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        wrap_distributed(tiny())
    with pytest.raises(RuntimeError, match="init_process_group"):
        average_buffers(tiny())


def test_trainer_without_ddp_is_rank_0_of_1():
    t = Trainer(tiny(), sgd(tiny()), progress=False)
    assert (t.rank, t.world_size) == (0, 1) and t.module is t.model

"""Multi-process: two gloo ranks on localhost (quantsim.distributed.launch, torch.multiprocessing) calibrate,
re-estimate BN statistics, train with DistributedDataParallel and export.

References are computed here, in one process, on the same batches (rank 0's, then rank 1's) and single-threaded
like the ranks, so float results can be compared bit for bit; histogram references are rebuilt with numpy.
"""
import contextlib
import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from quantsim import QuantizationSimModel, freeze_bn_stats, reestimate_and_fold, reestimate_bn_stats
from quantsim.distributed import (convert_sync_batchnorm, launch, on_rank_zero, resolve_group,
                                  revert_sync_batchnorm)
from quantsim.models import SmallBNCNN
from quantsim.observers import MinMaxObserver, MseObserver, PercentileObserver, SqnrObserver, sync_observers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

BATCH = 32


def _launch(fn, *args):
    """fn(*args) on 2 ranks; forkserver imports torch once for all tests (spawn would import it per process)."""
    return launch(fn, *args, nprocs=2, start_method="forkserver", threads=1)


@contextlib.contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mnist():
    from quantsim.data import load_mnist5k

    x, y = load_mnist5k()[:2]
    return x[:8 * BATCH], y[:8 * BATCH]


def _per_rank(x, n_batches=4):
    """Rank 0 gets batches 0..n-1, rank 1 the next n."""
    b = [x[i * BATCH:(i + 1) * BATCH] for i in range(2 * n_batches)]
    return [b[:n_batches], b[n_batches:]]


def _bn_model(seed=0, width=4):
    torch.manual_seed(seed)
    model = SmallBNCNN(width=width).eval()
    with torch.no_grad():  # BN statistics unlike the batches', so re-estimation and folding change something
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
    return model


class Saturating(nn.Module):
    """conv -> Hardtanh twice with large weights: every batch of MNIST digits reaches -1 and +1 after each
    Hardtanh, and the digits' background and stroke extremes at the input, so each rank's first batch already
    spans every later batch: the case in which combined histograms equal one process's exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv1, self.act1 = nn.Conv2d(1, 4, 3, stride=2), nn.Hardtanh()
        self.conv2, self.act2 = nn.Conv2d(4, 8, 3, stride=2), nn.Hardtanh()
        with torch.no_grad():
            self.conv1.weight.mul_(8.0)
            self.conv2.weight.mul_(8.0)

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))))


def _encodings(sim):
    return {n: (q.scale.detach().clone(), q.offset.detach().clone()) for n, q in sim.named_quantizers()
            if q.is_initialized()}


def _identical(a, b) -> bool:
    """Bit-identical nested results (tensors, tuples, lists, dicts, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_identical(u, v) for u, v in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    return a == b


def _assert_same_encodings(got, ref):
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name][0], ref[name][0]) and torch.equal(got[name][1], ref[name][1]), name


# ============================================================================ calibration


def _calibration_worker(bn_model, sat_model, batches):
    rank = dist.get_rank()
    out = {}
    for scheme in ("min_max", "tf_enhanced"):  # (tf_enhanced on SmallBNCNN: the approximate case, same on all ranks)
        sim = QuantizationSimModel(bn_model, quant_scheme=scheme)
        sim.compute_encodings(batches[rank], progress=False)
        out["bn", scheme] = _encodings(sim)
    for scheme in ("tf_enhanced", "percentile", "mse"):
        sim = QuantizationSimModel(sat_model, quant_scheme=scheme, dummy_input=batches[0][0])
        if scheme == "percentile":
            sim.set_percentile_value(99.0)
        sim.compute_encodings(batches[rank], progress=False)
        out["sat", scheme] = _encodings(sim)
    # an explicit group; rank 1 runs no batch at all and still ends with the combined encodings
    group = dist.new_group([0, 1])
    sim = QuantizationSimModel(bn_model, quant_scheme="tf_enhanced")
    sim.compute_encodings(lambda m: [m(b) for b in batches[0]] if rank == 0 else None, process_group=group)
    out["rank0_only"] = _encodings(sim)
    return out


def test_compute_encodings_combines_ranks_like_one_process(mnist):
    x, _ = mnist
    bn_model, sat_model = _bn_model(), Saturating()
    batches = _per_rank(x)
    got = _launch(_calibration_worker, bn_model, sat_model, batches)

    assert _identical(got[0], got[1])  # every rank ends with the same encodings, bit for bit

    with _one_thread():
        # precondition of the exact histogram case: each rank's first batch spans all batches of both ranks
        acts = {"input": [], "act1": [], "act2": []}
        with torch.no_grad():
            for b in batches[0] + batches[1]:
                h = sat_model.act1(sat_model.conv1(b))
                for name, t in (("input", b), ("act1", h), ("act2", sat_model.act2(sat_model.conv2(h)))):
                    acts[name].append(t)
        for name, ts in acts.items():
            overall = (min(float(t.min()) for t in ts), max(float(t.max()) for t in ts))
            for first in (ts[0], ts[len(ts) // 2]):
                assert (float(first.min()), float(first.max())) == overall, name

        # min/max: exact for any data
        sim = QuantizationSimModel(bn_model, quant_scheme="min_max")
        sim.compute_encodings(batches[0] + batches[1], progress=False)
        _assert_same_encodings(got[0]["bn", "min_max"], _encodings(sim))
        # histograms: exact when every rank bins on the common range from its first batch on
        for scheme in ("tf_enhanced", "percentile", "mse"):
            sim = QuantizationSimModel(sat_model, quant_scheme=scheme, dummy_input=batches[0][0])
            if scheme == "percentile":
                sim.set_percentile_value(99.0)
            sim.compute_encodings(batches[0] + batches[1], progress=False)
            _assert_same_encodings(got[0]["sat", scheme], _encodings(sim))
        # a rank without batches: the encodings of rank 0's batches alone
        sim = QuantizationSimModel(bn_model, quant_scheme="tf_enhanced")
        sim.compute_encodings(batches[0], progress=False)
        _assert_same_encodings(got[1]["rank0_only"], _encodings(sim))


def _observer_worker(cases):
    rank = dist.get_rank()
    observers, local = [], []
    for cls, axis, per_rank, _ in cases:
        obs = cls(axis)
        for x in per_rank[rank]:
            obs.update(x)
        observers.append(obs)
        local.append(obs.histogram() if obs.num_batches and hasattr(obs, "histogram") else None)
    together = [o for o, c in zip(observers, cases) if c[3]]
    sync_observers(together, dist.group.WORLD)  # five collectives for all of them
    for o, c in zip(observers, cases):
        if not c[3]:
            o.sync(dist.group.WORLD)  # one at a time
    out = [(loc, getattr(o, "histogram", lambda: None)(), o.observed_range(), o.num_batches,
            o.compute_range(0, 255, False), o.compute_range(-128, 127, True)) for loc, o in zip(local, observers)]
    try:  # ranks that disagree on what to combine get the same clear error
        sync_observers([MinMaxObserver()] * (rank + 1), dist.group.WORLD)
        error = None
    except ValueError as e:
        error = str(e)
    return out, error


def _numpy_redistribute(counts, lo0, hi0, lo, hi):
    """Counts on the bins of [lo0, hi0] moved onto those of [lo, hi]: the cumulative count is linear inside each old
    bin (uniform mass), read at the new edges; mass outside [lo, hi] lands in the edge bins."""
    nb = counts.size
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    edges = lo + (hi - lo) * np.arange(nb + 1) / nb
    if hi0 > lo0:
        cdf = np.interp(edges, lo0 + (hi0 - lo0) * np.arange(nb + 1) / nb, cum)
    else:  # everything at the point lo0 (= 0)
        cdf = np.where(edges > lo0, cum[-1], 0.0)
    cdf[0], cdf[-1] = 0.0, cum[-1]
    return np.diff(cdf)


def test_observer_sync_sums_histograms_on_the_common_range():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    exact = [  # every rank's first batch has the common range: counts simply add up
        [r(2, 300).clamp(-2, 3), torch.tensor([[-2.0, 3.0], [3.0, -2.0]])],
        [torch.cat([r(2, 200).clamp(-2, 3), torch.tensor([[-2.0, 3.0], [3.0, -2.0]])], 1), r(2, 50).clamp(-1, 1)],
    ]
    exact = [[t * torch.tensor([[1.0], [0.25]]) for t in ts] for ts in exact]  # two channels, different ranges
    grown = [  # ranks' ranges differ and grow; channel 1 is all zeros on rank 0; rank 1's data exceeds rank 0's caps
        [torch.stack([r(400), torch.zeros(400)]), torch.stack([r(100) * 2, torch.zeros(100)])],
        [torch.stack([r(300) * 0.5, r(300) + 1]), torch.stack([r(100) * 10, r(100) * 3])],
    ]
    flat = lambda per_rank: [[t.flatten() for t in ts] for ts in per_rank]  # noqa: E731
    cases = []  # (observer, channel axis, batches per rank, equal to one process?)
    for cls in (SqnrObserver, PercentileObserver, MseObserver, MinMaxObserver):
        cases += [(cls, 0, exact, True), (cls, None, flat(exact), True)]
    cases += [(SqnrObserver, 0, grown, False), (SqnrObserver, None, flat(grown), False),
              (MseObserver, 0, [grown[0], []], True)]  # rank 1 saw nothing: rank 0's statistics
    got = _launch(_observer_worker, cases)
    assert got[0][1] == got[1][1] and "different observers" in got[0][1]
    got = [got[0][0], got[1][0]]

    for i, (cls, axis, per_rank, same_as_one) in enumerate(cases):
        a, b = got[0][i], got[1][i]
        assert _identical(a[1:], b[1:])  # identical on both ranks
        # one process over rank 0's batches, then rank 1's
        ref = cls(axis)
        for x in per_rank[0] + per_rank[1]:
            ref.update(x)
        assert a[3] == ref.num_batches and _identical(a[2], ref.observed_range())
        if cls is MinMaxObserver:
            assert _identical(a[4:], (ref.compute_range(0, 255, False), ref.compute_range(-128, 127, True)))
            continue
        counts, lo, hi = a[1]
        ref_counts, ref_lo, ref_hi = ref.histogram()
        assert _identical((lo, hi), (ref_lo, ref_hi))  # the range one process reaches, always
        if same_as_one:  # ... and then the very same histogram and encodings
            assert _identical(counts, ref_counts)
            assert _identical(a[4:], (ref.compute_range(0, 255, False), ref.compute_range(-128, 127, True)))
            continue
        # otherwise each rank's counts are moved onto the common bins by overlap (channels already on them stay as
        # they are), then summed
        expect = 0
        for rank_out in (a, b):
            if rank_out[0] is None:
                continue
            c0, lo0, hi0 = (t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1) for t in rank_out[0])
            c0 = c0.reshape(-1, counts.shape[-1])
            ends = [(float(lo0.reshape(-1)[k]), float(hi0.reshape(-1)[k]), float(lo.reshape(-1)[k]),
                     float(hi.reshape(-1)[k])) for k in range(c0.shape[0])]
            rows = [c0[k].numpy() if e[:2] == e[2:] else _numpy_redistribute(c0[k].numpy(), *e)
                    for k, e in enumerate(ends)]
            expect = expect + np.stack(rows)
        np.testing.assert_allclose(counts.reshape(expect.shape).numpy(), expect, rtol=1e-9, atol=1e-9)
        total = sum(t.numel() for ts in per_rank for t in ts)
        assert float(counts.sum()) == pytest.approx(total, rel=1e-12)


# ============================================================================ BN re-estimation


def _bn_worker(model, batches):
    rank = dist.get_rank()
    sim = QuantizationSimModel(model, quant_scheme="min_max")
    sim.compute_encodings(batches[rank], progress=False)
    handle = reestimate_bn_stats(sim.model, batches[rank], num_batches=None, progress=False)
    bns = {n: (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
           for n, m in sim.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    moments = {n: (s.mean(), s.var(), s.count) for n, s in handle.stats.items()}
    folded = copy.deepcopy(sim)
    reestimate_and_fold(folded, batches[rank], num_batches=None, progress=False)
    return bns, moments, {k: v.clone() for k, v in folded.model.state_dict().items()}


def test_bn_reestimation_pools_all_ranks_samples(mnist):
    x, _ = mnist
    model, batches = _bn_model(), _per_rank(x, 3)
    got = _launch(_bn_worker, model, batches)

    assert _identical(got[0], got[1])  # identical on both ranks (folded weights and encodings too)

    # float64 reference: the inputs every BN receives (BN layers normalising with batch statistics), all batches
    with _one_thread(), torch.no_grad():
        sim = QuantizationSimModel(model, quant_scheme="min_max")
        sim.compute_encodings(batches[0] + batches[1], progress=False)
        seen = {n: [] for n, m in sim.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
        hooks = []
        for n, m in sim.model.named_modules():
            if n in seen:
                m.train()
                m.momentum = 0.0
                hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0].double())))
        for b in batches[0] + batches[1]:
            sim.model(b)
    bns, moments, _ = got[0]
    for n, xs in seen.items():
        data = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in xs], 1)
        mean, var = data.mean(1), data.var(1, unbiased=True)
        assert moments[n][2] == data.shape[1]
        torch.testing.assert_close(moments[n][0], mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(moments[n][1], var, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bns[n][0], mean.float(), rtol=1.2e-7, atol=0.0)  # float64 rounded once
        torch.testing.assert_close(bns[n][1], var.float(), rtol=1.2e-7, atol=0.0)
        assert bns[n][2] == 6  # num_batches_tracked: all batches of both ranks


# ============================================================================ DDP QAT


def _ddp_worker(model, calib, data):
    rank = dist.get_rank()
    out = {}
    for frozen_bn, steps, config in ((False, 3, "onnxruntime_cpu"), (True, 1, "default")):
        # range learning on; onnxruntime_cpu also simulates the int32 bias (derived, never learned)
        sim = QuantizationSimModel(model, config, quant_scheme="training_range_learning_with_tf_init")
        sim.compute_encodings(calib[rank], progress=False)
        if frozen_bn:
            freeze_bn_stats(sim.model)
            _disable_first_output_quantizer(sim)  # its range parameters take no gradient: DDP must not wait for one
        ddp = DistributedDataParallel(sim.model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        ddp.train()
        for step in range(steps):
            x, y = data[rank][step]
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
        out[frozen_bn] = {n: p.detach().clone() for n, p in sim.model.named_parameters()}
    return out


def _disable_first_output_quantizer(sim) -> None:
    name, q = next((n, q) for n, q in sim.named_quantizers() if "output_quantizers" in n)
    q.enabled = False
    assert q.learn_ranges and not q.scale.requires_grad, name


def test_ddp_qat_matches_one_process(mnist):
    x, y = mnist
    model = _bn_model()
    calib = _per_rank(x, 2)
    pairs = [(x[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]) for i in range(6)]
    data = [pairs[:3], pairs[3:]]
    ranks = _launch(_ddp_worker, model, calib, data)
    got = {frozen: (ranks[0][frozen], ranks[1][frozen]) for frozen in (False, True)}
    for frozen, (a, b) in got.items():  # identical parameters (weights, BN affine, quantizer scale/offset)
        assert any("quantizers" in k and "scale" in k for k in a) and _identical(a, b), frozen

    with _one_thread():
        # BN in train mode normalises with each rank's own batch: DDP's averaged gradient is one process's gradient
        # accumulated over the ranks' batches with each loss halved, and exactly so (halving is exact, and a sum
        # of two numbers does not depend on their order)
        sim = QuantizationSimModel(model, "onnxruntime_cpu", quant_scheme="training_range_learning_with_tf_init")
        sim.compute_encodings(calib[0] + calib[1], progress=False)
        optimizer = torch.optim.SGD(sim.model.parameters(), lr=0.05, momentum=0.9)
        sim.model.train()
        for step in range(3):
            optimizer.zero_grad()
            for r in (0, 1):
                (F.cross_entropy(sim.model(data[r][step][0]), data[r][step][1]) / 2).backward()
            optimizer.step()
        for k, p in sim.model.named_parameters():
            assert torch.equal(got[False][0][k], p.detach()), k

        # frozen BN makes every sample independent: one step on the concatenated batch is the same step up to the
        # order of float32 sums over the batch (a few ulp of the gradient, times lr)
        sim = QuantizationSimModel(model, quant_scheme="training_range_learning_with_tf_init")
        sim.compute_encodings(calib[0] + calib[1], progress=False)
        freeze_bn_stats(sim.model)
        _disable_first_output_quantizer(sim)
        optimizer = torch.optim.SGD(sim.model.parameters(), lr=0.05, momentum=0.9)
        sim.model.train()
        optimizer.zero_grad()
        F.cross_entropy(sim.model(torch.cat([data[0][0][0], data[1][0][0]])),
                        torch.cat([data[0][0][1], data[1][0][1]])).backward()
        optimizer.step()
        for k, p in sim.model.named_parameters():
            torch.testing.assert_close(got[True][0][k], p.detach(), rtol=1e-5, atol=1e-6, msg=k)


def test_convert_sync_batchnorm_keeps_quantizers_and_state():
    model = _bn_model()
    sim = QuantizationSimModel(model, config="per_tensor", quant_scheme="min_max")
    x = torch.randn(4, 1, 28, 28)
    sim.compute_encodings([x], progress=False)
    freeze_bn_stats(sim.model)
    keys, before = list(sim.model.state_dict()), sim.model(x)
    quantizers = [n for n, _ in sim.named_quantizers()]
    convert_sync_batchnorm(sim.model)
    assert isinstance(sim.model.bn1, nn.SyncBatchNorm) and type(sim.model.bn1).__name__ == "QuantizedSyncBatchNorm"
    assert list(sim.model.state_dict()) == keys and [n for n, _ in sim.named_quantizers()] == quantizers
    sim.model.train()  # frozen BN: normalises with running statistics, so (single process) the output is unchanged
    assert torch.equal(sim.model(x), before)
    revert_sync_batchnorm(sim.model)
    assert type(sim.model.bn1).__name__ == "QuantizedBatchNorm2d" and not hasattr(sim.model.bn1, "process_group")
    assert torch.equal(sim.model.eval()(x), before)


# ============================================================================ export


def _export_worker(model, calib, out_dir):
    import onnx

    from quantsim import exporter

    rank = dist.get_rank()
    sim = QuantizationSimModel(model, quant_scheme="min_max")  # built here: a sim does not pickle
    sim.compute_encodings(calib[rank], progress=False)
    dummy = calib[0][0][:1]
    calls, real = [], exporter._export

    def counted(*args, **kwargs):  # quantsim's own writer, counted per rank
        calls.append(args[1])
        if args[1].endswith("fail"):
            raise exporter.ExportError("cannot export 'conv2' (made-up failure)", "conv2")
        return real(*args, **kwargs)

    exporter._export = counted
    paths = sim.export(out_dir, "model", dummy)
    # when export returns on any rank, rank 0 has written every file completely
    complete = [len(onnx.load(paths.onnx).graph.node) > 0, bool(json.load(open(paths.encodings))),
                len(onnx.load(paths.qdq).graph.node) > 0, os.path.getsize(paths.safetensors) > 0]
    listing = sorted(os.listdir(out_dir))
    try:
        sim.export(os.path.join(out_dir, "fail"), "model", dummy)
        error = None
    except exporter.ExportError as e:
        error = (str(e), e.module)
    writes, real_write = [], exporter._write_all
    exporter._write_all = lambda files: (writes.append(sorted(files)), real_write(files))[1]
    os.makedirs(os.path.join(out_dir, "state"), exist_ok=True)
    state = sim.save_state(os.path.join(out_dir, "state", "sim.safetensors"))
    saved = (state, os.path.getsize(state) > 0, writes)
    return paths, complete, listing, error, calls, saved


def test_export_writes_one_complete_set_from_rank_zero(mnist, tmp_path):
    x, _ = mnist
    got = _launch(_export_worker, _bn_model(), _per_rank(x, 1), str(tmp_path))
    names = ["model.encodings", "model.onnx", "model.safetensors", "model_qdq.onnx"]
    for paths, complete, listing, error, _, saved in got:
        assert paths == got[0][0] and all(complete) and listing == names
        assert error == ("cannot export 'conv2' (made-up failure)", "conv2")  # rank 0's error, on every rank
        assert saved[:2] == (str(tmp_path / "state" / "sim.safetensors"), True)  # complete when it returns
    assert got[0][4] == [str(tmp_path), str(tmp_path / "fail")] and got[1][4] == []  # only rank 0 exports
    assert got[0][5][2] == [[str(tmp_path / "state" / "sim.safetensors")]] and got[1][5][2] == []  # and saves
    assert sorted(os.listdir(tmp_path)) == names + ["state"]  # one set, no temporaries
    assert os.listdir(tmp_path / "state") == ["sim.safetensors"]
    enc = json.loads((tmp_path / "model.encodings").read_text())
    assert enc["activation_encodings"] and enc["param_encodings"]


def test_single_process_helpers_are_no_ops():
    assert resolve_group() is None
    assert on_rank_zero(lambda: 42, None) == 42
    with pytest.raises(RuntimeError, match="not initialised"):
        resolve_group(object())

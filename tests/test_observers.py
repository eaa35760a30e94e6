"""Observers against independent references: torch.aminmax, numpy histograms/percentiles, a float64
brute-force of AIMET's SQNR objective, and real quantize-dequantize errors."""
import math
import time

import numpy as np
import pytest
import torch

from quantsim import numerics
from quantsim.observers import (
    MinMaxObserver,
    MseObserver,
    NonFiniteError,
    PercentileObserver,
    SqnrObserver,
    make_observer,
)

EPS = float(torch.finfo(torch.float32).eps)
HIST_SCHEMES = ["tf_enhanced", "percentile", "mse"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These tensors are small: intra-op threads only add contention on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _qdq(x, lo, hi, qmin, qmax, symmetric):
    """Quantize-dequantize x per-tensor with the encoding numerics derives from (lo, hi)."""
    scale, offset = numerics.encoding_from_range(lo, hi, qmin, qmax, symmetric)
    return torch.fake_quantize_per_tensor_affine(x, float(scale), int(-offset), qmin, qmax)


def _mse(x, lo, hi, qmin, qmax, symmetric):
    return float(((_qdq(x, lo, hi, qmin, qmax, symmetric) - x) ** 2).mean())


def _channel_rows(x, axis):
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


# ------------------------------------------------------------------------------------------------ min_max
def test_min_max_per_tensor_matches_aminmax_of_concatenation():
    batches = [torch.randn(4, 7, 5, generator=_gen(i)) * (i + 1) + i for i in range(5)]
    obs = MinMaxObserver()
    for b in batches:
        obs.update(b)
    ref_min, ref_max = torch.aminmax(torch.cat(batches))
    lo, hi = obs.compute_range(0, 255, False)
    assert lo.shape == () and hi.shape == ()
    assert lo.dtype == torch.float32 and hi.dtype == torch.float32
    assert torch.equal(lo, ref_min) and torch.equal(hi, ref_max)
    assert obs.num_batches == 5
    omin, omax = obs.observed_range()
    assert torch.equal(omin, ref_min) and torch.equal(omax, ref_max)


@pytest.mark.parametrize("axis", [0, 1])
def test_min_max_per_channel_matches_aminmax_of_concatenation(axis):
    # channels along `axis`; batches are concatenated along another dim (channel count is fixed)
    cat_dim = 2
    batches = [torch.randn(6, 3, 4, 5, generator=_gen(i)) * torch.linspace(0.1, 3, 6 if axis == 0 else 3).reshape(
        [-1 if d == axis else 1 for d in range(4)]) for i in range(4)]
    obs = MinMaxObserver(channel_axis=axis)
    for b in batches:
        obs.update(b)
    full = torch.cat(batches, dim=cat_dim)
    ref_min, ref_max = torch.aminmax(_channel_rows(full, axis), dim=1)
    lo, hi = obs.compute_range(-128, 127, True)
    assert lo.shape == (full.shape[axis],)
    assert torch.equal(lo, ref_min) and torch.equal(hi, ref_max)


def test_min_max_streaming_equals_single_update_exactly():
    batches = [torch.randn(50, generator=_gen(i)) * 3 for i in range(6)]
    a, b = MinMaxObserver(), MinMaxObserver()
    for t in batches:
        a.update(t)
    b.update(torch.cat(batches))
    assert all(torch.equal(u, v) for u, v in zip(a.compute_range(0, 255, False), b.compute_range(0, 255, False)))


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("scheme", ["min_max", *HIST_SCHEMES])
@pytest.mark.parametrize("channel_axis", [None, 0])
def test_non_finite_input_raises_and_leaves_state_untouched(scheme, channel_axis):
    obs = make_observer(scheme, channel_axis)
    good = torch.randn(4, 10, generator=_gen())
    obs.update(good)
    before = [t.clone() for t in obs.observed_range()]

    x = good.clone()
    x[0, 1] = x[2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"2 NaN"):
        obs.update(x)
    x = good.clone()
    x[1, 1], x[3, 3], x[3, 4] = float("inf"), float("-inf"), float("inf")
    with pytest.raises(NonFiniteError, match=r"3 Inf"):
        obs.update(x)
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"1 NaN and 3 Inf"):
        obs.update(x)
    assert issubclass(NonFiniteError, ValueError)
    assert obs.num_batches == 1
    assert all(torch.equal(u, v) for u, v in zip(before, obs.observed_range()))


@pytest.mark.parametrize("scheme", ["min_max", *HIST_SCHEMES])
def test_no_data_raises(scheme):
    obs = make_observer(scheme)
    assert obs.num_batches == 0
    with pytest.raises(RuntimeError):
        obs.compute_range(0, 255, False)
    with pytest.raises(RuntimeError):
        obs.observed_range()
    obs.update(torch.randn(10))
    obs.reset()
    assert obs.num_batches == 0
    with pytest.raises(RuntimeError):
        obs.compute_range(-128, 127, True)


def test_make_observer_names_and_bad_scheme():
    assert isinstance(make_observer("min_max"), MinMaxObserver)
    assert isinstance(make_observer("tf_enhanced", 0), SqnrObserver)
    assert isinstance(make_observer("mse"), MseObserver)
    p = make_observer("percentile", None, percentile=99.5)
    assert isinstance(p, PercentileObserver) and p.percentile == 99.5
    assert make_observer("tf_enhanced", 1).channel_axis == 1
    with pytest.raises(ValueError, match="bogus"):
        make_observer("bogus")


def test_channel_count_must_not_change():
    obs = make_observer("tf_enhanced", 0)
    obs.update(torch.randn(4, 10))
    with pytest.raises(ValueError, match="channels"):
        obs.update(torch.randn(5, 10))


# ------------------------------------------------------------------------------------------------ histogram
@pytest.mark.parametrize("channel_axis", [None, 0])
def test_histogram_counts_match_numpy(channel_axis):
    x = torch.randn(3, 4000, generator=_gen(1)) * torch.tensor([[0.5], [2.0], [7.0]])
    x += torch.tensor([[1.0], [-3.0], [0.0]])
    obs = SqnrObserver(channel_axis)
    obs.update(x)
    counts, lo, hi = obs.histogram()
    rows = x.reshape(1, -1) if channel_axis is None else x
    counts = counts.reshape(rows.shape[0], -1)
    lo, hi = lo.reshape(-1), hi.reshape(-1)
    for c in range(rows.shape[0]):
        r = rows[c].double().numpy()
        assert float(lo[c]) == min(r.min(), 0.0) and float(hi[c]) == max(r.max(), 0.0)
        ref, _ = np.histogram(r, bins=512, range=(float(lo[c]), float(hi[c])))
        assert np.abs(counts[c].numpy() - ref).sum() <= 2  # float32 vs float64 binning at exact edges


@pytest.mark.parametrize("n", [1, 9, 150])
@pytest.mark.parametrize("scheme", [SqnrObserver, MseObserver])
def test_short_rows_keep_only_occupied_bins_with_histc_counts(n, scheme):
    """A first per-channel batch of short rows (weights) keeps only each channel's occupied bins; they are the bins
    torch.histc fills (x == max in the last bin), and a second batch adds to them."""
    x = torch.randn(40, n, generator=_gen(5)) * torch.rand(40, 1, generator=_gen(6))
    x[0] = 0.0  # a channel of zeros: all in bin 0
    x[1, 0] = 4.0  # the maximum exactly on the last edge
    obs = scheme(channel_axis=0)
    obs.update(x)
    assert obs._sparse is not None and obs._counts is None
    index, counts = obs._occupied(slice(None))
    counts_full, lo, hi = obs.histogram()  # built from the occupied bins
    assert obs._sparse is None
    for c in range(40):
        ref = torch.histc(x[c].double(), 512, float(lo[c]), float(hi[c])) if hi[c] > lo[c] else None
        if ref is None:  # zero width: histc would spread the zeros; every value is in bin 0
            ref = torch.zeros(512, dtype=torch.float64)
            ref[0] = n
        assert torch.equal(counts_full[c], ref), c
        occupied = ref.nonzero().reshape(-1)
        k = occupied.numel()
        assert torch.equal(index[c, :k], occupied.double()) and torch.equal(counts[c, :k], ref[occupied])
        assert (index[c, k:] == 512).all() and (counts[c, k:] == 0).all()  # padding, as _compact gives it
    obs = scheme(channel_axis=0)
    obs.update(x)
    obs.update(x * 0.5)  # inside the first range: the same bins
    both, lo2, hi2 = obs.histogram()
    assert torch.equal(lo2, lo) and torch.equal(hi2, hi)
    for c in range(1, 40):
        ref = torch.histc(torch.cat([x[c], x[c] * 0.5]).double(), 512, float(lo[c]), float(hi[c]))
        assert torch.equal(both[c], ref), c


def test_histogram_growth_is_capped_and_mass_conserved():
    obs = PercentileObserver()
    obs.update(torch.linspace(-1.0, 1.0, 1001))  # first range [-1, 1], growth limit [-3, 3]
    obs.update(torch.tensor([2.0, 2.5]))  # grows to 2.5
    counts, lo, hi = obs.histogram()
    assert float(lo) == -1.0 and float(hi) == 2.5
    obs.update(torch.tensor([-0.5, 10.0, 50.0]))  # 10 and 50 exceed the cap: clipped into the last bin
    counts, lo, hi = obs.histogram()
    assert float(lo) == -1.0 and float(hi) == 3.0
    assert float(counts.sum()) == pytest.approx(1001 + 2 + 3)
    assert float(counts[-1]) >= 2.0
    # the raw running range is exact regardless
    assert float(obs.observed_range()[1]) == 50.0
    # redistributed histogram still approximates the data: compare CDFs at the new bin edges
    data = np.concatenate([np.linspace(-1, 1, 1001), [2.0, 2.5, -0.5, 3.0, 3.0]])
    ref, _ = np.histogram(data, bins=512, range=(-1.0, 3.0))
    width = 4.0 / 512
    # redistribution spreads each old bin's mass over at most two new bins: CDFs agree within one old bin
    assert np.abs(np.cumsum(counts.numpy()) - np.cumsum(ref)).max() <= 1001 * (2.0 / 512) / width + 3


@pytest.mark.parametrize("channel_axis", [None, 0])
def test_all_zero_first_batch_takes_range_from_next_batch(channel_axis):
    obs = SqnrObserver(channel_axis)
    obs.update(torch.zeros(2, 100))
    x = torch.randn(2, 100, generator=_gen(3)) * 5
    obs.update(x)
    counts, lo, hi = obs.histogram()
    rows = x.reshape(1, -1) if channel_axis is None else x
    assert torch.allclose(lo.reshape(-1), rows.min(1).values.clamp(max=0))
    assert torch.allclose(hi.reshape(-1), rows.max(1).values.clamp(min=0))
    assert float(counts.sum()) == 400
    lo_r, hi_r = obs.compute_range(0, 255, False)
    assert torch.all(lo_r < 0) and torch.all(hi_r > 0)


@pytest.mark.parametrize("scheme", HIST_SCHEMES)
@pytest.mark.parametrize("channel_axis", [None, 0])
def test_histogram_streaming_equals_single_update_without_growth(scheme, channel_axis):
    kwargs = {"percentile": 99.0} if scheme == "percentile" else {}
    x = torch.randn(4, 3000, generator=_gen(5)) * torch.tensor([[1.0], [0.3], [4.0], [2.0]])
    # put each channel's extremes in the first batch so the histogram range never grows
    order = torch.argsort(x.abs(), dim=1, descending=True)
    x = x.gather(1, order)
    a, b = make_observer(scheme, channel_axis, **kwargs), make_observer(scheme, channel_axis, **kwargs)
    for chunk in x.split(500, dim=1):
        a.update(chunk)
    b.update(x)
    ca, la, ha = a.histogram()
    cb, lb, hb = b.histogram()
    assert torch.equal(la, lb) and torch.equal(ha, hb) and torch.equal(ca, cb)
    bin_width = (hb - lb) / 512
    for qmin, qmax, sym in [(0, 255, False), (-128, 127, True)]:
        ra, rb = a.compute_range(qmin, qmax, sym), b.compute_range(qmin, qmax, sym)
        for u, v in zip(ra, rb):
            assert torch.all((u - v).abs() <= bin_width + 1e-6)


# The fast paths below are checked against what they replace: torch.histc for the per-tensor binning, the
# per-channel tensor arithmetic for the per-tensor float bookkeeping, full argmins for the pruned searches.
def _histc_cases():
    g = _gen(21)
    relu6 = (torch.randn(40000, generator=g) * 3).clamp(0, 6)  # half zeros, a pile at the top edge
    edges = torch.randint(-256, 256, (30000,), generator=g) / 64.0  # values on bin edges of [-4, 4)
    return {
        "normal": torch.randn(30000, generator=g) * 2 + 0.5,
        "relu6": relu6,
        "bin_edges": torch.cat([edges, torch.tensor([-4.0, 4.0])]),
        "negative": -torch.rand(20000, generator=g) * 3,
        "float64": torch.randn(20000, generator=g, dtype=torch.float64),
        "tiny_range": torch.randn(5000, generator=g) * 1e-30,
    }


@pytest.mark.parametrize("case", list(_histc_cases()))
@pytest.mark.parametrize("num_bins", [512, 100])
def test_per_tensor_binning_equals_torch_histc(case, num_bins):
    x = _histc_cases()[case]
    obs = PercentileObserver(num_bins=num_bins)
    obs.update(x)
    counts, lo, hi = obs.histogram()
    ref = torch.histc(x, num_bins, float(lo), float(hi)).double()
    assert torch.equal(counts, ref)


@pytest.mark.parametrize("threads", [1, 2])
def test_binning_of_large_inputs_equals_torch_histc(threads):
    """Inputs over 2^20 elements are counted in two halves on two threads; nonnegative ones in 4 lanes."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = _gen(22)
        for x in [torch.randn((1 << 20) + 4099, generator=g).clamp(min=0), torch.randn(1 << 20, generator=g)]:
            obs = PercentileObserver()
            obs.update(x)
            counts, lo, hi = obs.histogram()
            assert torch.equal(counts, torch.histc(x, 512, float(lo), float(hi)).double())
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("growth", [3.0, 2.7, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_per_tensor_statistics_equal_per_channel_tensor_arithmetic(growth, dtype):
    """Per tensor the running range, growth limits and clipping are tracked in Python floats rounded like
    the state dtype; per channel in tensors. One channel must give bit-identical histograms and ranges."""
    g = _gen(23)
    batches = [torch.zeros(300), torch.randn(300, generator=g) * 0.1]  # all-zero first batch
    batches += [torch.randn(300, generator=g) * s + m for s, m in [(1.0, 0.3), (2.5, -1.0), (40.0, 0.0), (0.5, 7.0)]]
    batches += [(torch.randn(300, generator=g) * 3).clamp(min=0)]
    pt, pc = SqnrObserver(range_growth_limit=growth), SqnrObserver(0, range_growth_limit=growth)
    for b in batches:
        b = b.to(dtype)
        pt.update(b)
        pc.update(b[None])
        for u, v in zip(pt.histogram(), pc.histogram()):
            assert torch.equal(u.reshape(-1), v.reshape(-1)) and u.dtype == v.dtype
        for u, v in zip(pt.observed_range(), pc.observed_range()):
            assert torch.equal(u.reshape(-1), v.reshape(-1)) and u.dtype == v.dtype


# ------------------------------------------------------------------------------------------------ tf_enhanced
def _sqnr_reference(counts, lo, hi, qmin, qmax, symmetric, gamma=3.0):
    """AIMET v2 SqnrEncodingAnalyzer for one histogram, written out with loops in float64."""
    ns = qmax - qmin
    nb = len(counts)
    min_v, max_v = min(lo, 0.0), max(hi, 0.0)
    max_v = max(max_v, min_v + EPS * ns)
    cands = []
    if symmetric:
        max_delta = 2 * max(max_v, -min_v) / ns if qmin < 0 else max_v / ns
        for k in range(1, 102):
            cands.append((max(max_delta * k / 100, EPS), float(qmin)))
    else:
        max_delta = (max_v - min_v) / ns
        obs_off = np.round(min_v / max_delta)
        obs_min = max_delta * obs_off
        obs_max = obs_min + max_delta * ns
        n_off = min(ns + 2, 21)
        offsets = [np.round(-ns + k * ns / (n_off - 2)) for k in range(n_off - 1)] + [obs_off]
        for i in range(1, 18):
            delta = max_delta * i / 16
            for off in offsets:
                t_min = max(obs_min, delta * off)
                t_max = min(obs_max, delta * off + delta * ns)
                d = max((t_max - t_min) / ns, EPS)
                cands.append((d, np.round(t_min / d)))
    width = (hi - lo) / nb
    best = None
    for d, off in cands:
        noise = 0.0
        for b in range(nb):
            mid = lo + width / 2 + width * b
            q = np.round(mid / d - off)
            err = ((min(max(q, 0), ns) + off) * d - mid) ** 2 * counts[b]
            noise += gamma * err if (q < 0 or q > ns) else err
        if best is None or noise < best[0]:
            best = (noise, d, off)
    return best


@pytest.mark.parametrize("bits,symmetric,strict", [(4, False, False), (3, False, False), (4, True, False),
                                                  (4, True, True), (8, False, False)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sqnr_matches_float64_brute_force_reference(bits, symmetric, strict, seed):
    g = _gen(seed)
    x = torch.cat([torch.randn(400, generator=g) * 1.5 + 0.7, torch.rand(10, generator=g) * 12 - 4])
    obs = SqnrObserver(num_bins=48)
    obs.update(x)
    counts, lo, hi = obs.histogram()
    qmin, qmax = numerics.grid(bits, symmetric, strict)
    _, d, off = _sqnr_reference(counts.numpy().astype(np.float64), float(lo), float(hi), qmin, qmax, symmetric)
    ref_min, ref_max = off * d, off * d + (qmax - qmin) * d
    got_min, got_max = obs.compute_range(qmin, qmax, symmetric)
    assert float(got_min) == pytest.approx(ref_min, rel=1e-5, abs=1e-6)
    assert float(got_max) == pytest.approx(ref_max, rel=1e-5, abs=1e-6)


def test_sqnr_unsigned_symmetric_grid():
    x = torch.rand(5000, generator=_gen()) ** 3 * 6
    x[:3] = 60.0
    obs = SqnrObserver()
    obs.update(x)
    counts, lo, hi = obs.histogram()
    _, d, off = _sqnr_reference(counts.numpy(), float(lo), float(hi), 0, 255, True)
    got_min, got_max = obs.compute_range(0, 255, True)
    assert float(got_min) == 0.0 and off == 0.0
    assert float(got_max) == pytest.approx(255 * d, rel=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_sqnr_clips_outliers_and_beats_min_max(symmetric):
    # The objective is a sum over all values: clipping pays off only when the resolution gained on the bulk
    # outweighs gamma * (clip distance)^2 of the outliers, so the bulk must be large (at 8 bits, or with
    # 20000 values, these 4 outliers are kept; at 4 bits with 200000 values they are clipped).
    x = torch.randn(200000, generator=_gen(7))
    x[:4] = torch.tensor([60.0, 45.0, -30.0, 52.0])
    qmin, qmax = numerics.grid(4, symmetric)
    sq, mm = SqnrObserver(), MinMaxObserver()
    sq.update(x)
    mm.update(x)
    s_lo, s_hi = sq.compute_range(qmin, qmax, symmetric)
    m_lo, m_hi = mm.compute_range(qmin, qmax, symmetric)
    assert float(s_hi) < 0.5 * float(m_hi)  # the outliers are clipped
    err_sq, err_mm = _mse(x, s_lo, s_hi, qmin, qmax, symmetric), _mse(x, m_lo, m_hi, qmin, qmax, symmetric)
    signal = float((x**2).mean())
    assert 10 * math.log10(signal / err_sq) > 10 * math.log10(signal / err_mm) + 3.0
    # and the objective agrees: the chosen candidate's expected noise is below min_max's grid
    ns = qmax - qmin
    s_scale, s_off = numerics.encoding_from_range(s_lo, s_hi, qmin, qmax, symmetric)
    m_scale, m_off = numerics.encoding_from_range(m_lo, m_hi, qmin, qmax, symmetric)
    d = torch.tensor([[float(s_scale), float(m_scale)]], dtype=torch.float64)
    o = torch.tensor([[float(s_off) + qmin, float(m_off) + qmin]], dtype=torch.float64)
    noise = sq.expected_noise(d, o, ns)[0]
    assert noise[0] < noise[1]


@pytest.mark.parametrize("symmetric", [False, True])
def test_sqnr_on_uniform_data_is_close_to_min_max(symmetric):
    x = torch.rand(100000, generator=_gen(8)) * 5 - 1.5
    qmin, qmax = numerics.grid(8, symmetric)
    sq, mm = SqnrObserver(), MinMaxObserver()
    sq.update(x)
    mm.update(x)
    s_lo, s_hi = sq.compute_range(qmin, qmax, symmetric)
    s_scale, _ = numerics.encoding_from_range(s_lo, s_hi, qmin, qmax, symmetric)
    m_scale, _ = numerics.encoding_from_range(*mm.compute_range(qmin, qmax, symmetric), qmin, qmax, symmetric)
    assert float(s_scale) == pytest.approx(float(m_scale), rel=0.07)


@pytest.mark.parametrize("symmetric", [False, True])
def test_sqnr_per_channel_equals_per_tensor_on_each_channel(symmetric):
    g = _gen(9)
    scales = torch.tensor([0.01, 0.5, 1.0, 3.0, 20.0, 1.0])
    shifts = torch.tensor([0.0, 1.0, -2.0, 0.0, 5.0, 0.0])
    batches = [torch.randn(6, 300, generator=g) * scales[:, None] + shifts[:, None] for _ in range(3)]
    batches[1][1, 0] = 9.0  # growth in a later batch (within the limit) ...
    batches[2][2, 5] = -40.0  # ... and beyond it
    batches = [b.T.contiguous() for b in batches]  # channels on axis 1
    qmin, qmax = numerics.grid(8, symmetric)
    pc = SqnrObserver(channel_axis=1)
    for b in batches:
        pc.update(b)
    got_lo, got_hi = pc.compute_range(qmin, qmax, symmetric)
    for c in range(6):
        pt = SqnrObserver()
        for b in batches:
            pt.update(b[:, c])
        lo, hi = pt.compute_range(qmin, qmax, symmetric)
        assert torch.allclose(got_lo[c], lo, rtol=1e-6, atol=0) and torch.allclose(got_hi[c], hi, rtol=1e-6, atol=0)


def _search_cases():
    """(observer input, qmin, qmax, symmetric): per-tensor activations and per-channel weights."""
    g = _gen(31)
    on_grid = torch.round(torch.randn(6, 400, generator=g) * 8) / 8  # midpoints tied with grid points
    weights = torch.randn(48, 9, generator=g) * torch.rand(48, 1, generator=g)
    wide = torch.randn(24, 300, generator=g) * torch.rand(24, 1, generator=g)
    wide[3, :3] = 9.0
    short = torch.randn(40, 150, generator=g) * torch.rand(40, 1, generator=g)  # kept as occupied bins
    short[5, :2] = -6.0
    act = torch.randn(20000, generator=g)
    act[:5] = torch.tensor([25.0, -12.0, 30.0, 18.0, -20.0])
    relu = (torch.randn(20000, generator=g) * 2).clamp(min=0)
    cases = []
    for bits in (8, 4, 2):
        for symmetric, strict in [(False, False), (True, False), (True, True)]:
            qmin, qmax = numerics.grid(bits, symmetric, strict)
            cases += [(x, qmin, qmax, symmetric) for x in (on_grid, weights, wide, short, act, relu)]
        qmin, qmax = numerics.grid(bits, True, False, True)  # unsigned symmetric grid: nonnegative data
        cases.append((relu, qmin, qmax, True))
    return cases


@pytest.mark.parametrize("gamma", [3.0, 1.0, 0.5])
def test_sqnr_pruned_search_equals_argmin_of_expected_noise(gamma):
    """compute_range evaluates per bin only candidates whose closed-form lower bound does not exceed the
    smallest upper bound: the result is the argmin over all candidates, tie-break included."""
    for x, qmin, qmax, symmetric in _search_cases():
        for num_bins in (512, 48):
            obs = SqnrObserver(None if x.dim() == 1 else 0, num_bins=num_bins, gamma=gamma)
            obs.update(x)
            lo, hi = obs.compute_range(qmin, qmax, symmetric)  # on the occupied bins alone, for short rows
            deltas, offsets = obs.candidates(qmin, qmax, symmetric)
            best = obs.expected_noise(deltas, offsets, qmax - qmin).argmin(dim=1, keepdim=True)  # full histogram
            delta, offset = deltas.gather(1, best).reshape(-1), offsets.gather(1, best).reshape(-1)
            assert torch.equal(lo.reshape(-1), (offset * delta).float())
            assert torch.equal(hi.reshape(-1), (offset * delta + (qmax - qmin) * delta).float())


def test_sqnr_uniform_noise_option_runs():
    x = torch.randn(5000, generator=_gen(4))
    obs = SqnrObserver(quant_noise="uniform")
    obs.update(x)
    lo, hi = obs.compute_range(0, 255, False)
    assert -4.5 < float(lo) < -1.0 and 1.0 < float(hi) < 4.5


# ------------------------------------------------------------------------------------------------ percentile
@pytest.mark.parametrize("channel_axis", [None, 0])
def test_percentile_100_equals_min_max(channel_axis):
    batches = [torch.randn(3, 200, generator=_gen(i)) * 2 + 1 for i in range(3)]
    p, m = PercentileObserver(channel_axis), MinMaxObserver(channel_axis)
    for b in batches:
        p.update(b)
        m.update(b)
    for u, v in zip(p.compute_range(0, 255, False), m.compute_range(0, 255, False)):
        assert torch.equal(u, v)


@pytest.mark.parametrize(
    "pct,growth", [(99.0, False), (99.9, False), (99.99, False), (90.0, False), (99.0, True), (90.0, True)]
)
@pytest.mark.parametrize("channel_axis", [None, 0])
def test_percentile_close_to_numpy(pct, channel_axis, growth):
    """Within one histogram bin of numpy's percentile. After the range grew, within two: redistribution
    spreads an old bin's mass uniformly (repeatedly, once per growth), so in sparse tails (p >= 99.9)
    the error after several growths can reach a few bins; docs/calibration.md."""
    x = torch.randn(3, 20000, generator=_gen(11)) * torch.tensor([[1.0], [0.2], [5.0]])
    x += torch.tensor([[0.0], [2.0], [-1.0]])
    x[1, :5] = 30.0  # outliers
    if not growth:  # each channel's extremes (repeated) first: the histogram range never changes
        x = torch.cat([x.amin(1, keepdim=True), x.amax(1, keepdim=True), x], dim=1)
    obs = PercentileObserver(channel_axis, percentile=pct)
    for chunk in x.split(4000, dim=1):
        obs.update(chunk)
    lo, hi = obs.compute_range(0, 255, False)
    _, h_lo, h_hi = obs.histogram()
    rows = x.reshape(1, -1) if channel_axis is None else x
    if not growth:
        assert torch.equal(h_lo.reshape(-1), rows.min(1).values.clamp(max=0))
        assert torch.equal(h_hi.reshape(-1), rows.max(1).values.clamp(min=0))
    lo, hi, h_lo, h_hi = (t.reshape(-1) for t in (lo, hi, h_lo, h_hi))
    for c in range(rows.shape[0]):
        r = rows[c].double().numpy()
        tol = (2 if growth else 1) * float(h_hi[c] - h_lo[c]) / 512 + 1e-6
        assert abs(float(lo[c]) - np.percentile(r, 100 - pct)) <= tol
        assert abs(float(hi[c]) - np.percentile(r, pct)) <= tol


def test_percentile_attribute_is_settable_and_validated():
    obs = PercentileObserver()
    obs.update(torch.randn(10000, generator=_gen()))
    full = obs.compute_range(0, 255, False)
    obs.percentile = 95.0
    clipped = obs.compute_range(0, 255, False)
    assert float(clipped[1]) < float(full[1]) and float(clipped[0]) > float(full[0])
    for bad in (49.0, 100.5):
        with pytest.raises(ValueError):
            obs.percentile = bad


# ------------------------------------------------------------------------------------------------ mse
@pytest.mark.parametrize("dist", ["normal", "laplace", "outliers"])
@pytest.mark.parametrize("bits,symmetric", [(8, False), (4, False), (8, True), (4, True)])
def test_mse_range_has_lower_actual_error_than_alternatives(dist, bits, symmetric):
    g = _gen(12)
    if dist == "normal":
        x = torch.randn(50000, generator=g) + 0.5
    elif dist == "laplace":
        u = torch.rand(50000, generator=g) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs())
    else:
        x = torch.randn(50000, generator=g)
        x[:10] = 25.0
    qmin, qmax = numerics.grid(bits, symmetric)
    obs, mm, sq = MseObserver(), MinMaxObserver(), SqnrObserver()
    for o in (obs, mm, sq):
        o.update(x)
    lo, hi = obs.compute_range(qmin, qmax, symmetric)
    chosen = _mse(x, lo, hi, qmin, qmax, symmetric)
    m_lo, m_hi = mm.compute_range(qmin, qmax, symmetric)
    # Clearly different ranges must lose. Ranges within a few percent of the optimum may win by sampling
    # noise: the mean rounding error of 50000 values has ~0.4% relative spread, below what any model of
    # the histogram can resolve, so those comparisons allow 1%.
    for a_lo, a_hi in [(m_lo, m_hi), (m_lo * 0.2, m_hi * 0.2), (m_lo * 0.4, m_hi * 0.4)]:
        assert chosen <= _mse(x, a_lo, a_hi, qmin, qmax, symmetric) * (1 + 1e-6)
    for a_lo, a_hi in [(m_lo * 0.7, m_hi * 0.7), sq.compute_range(qmin, qmax, symmetric)]:
        assert chosen <= _mse(x, a_lo, a_hi, qmin, qmax, symmetric) * 1.01


def test_mse_per_channel_equals_per_tensor_on_each_channel():
    x = torch.randn(5, 2000, generator=_gen(13)) * torch.tensor([[0.1], [1.0], [3.0], [1.0], [7.0]])
    x[3, :4] = 12.0
    pc = MseObserver(channel_axis=0)
    pc.update(x)
    for symmetric in (False, True):
        qmin, qmax = numerics.grid(8, symmetric)
        got = pc.compute_range(qmin, qmax, symmetric)
        for c in range(5):
            pt = MseObserver()
            pt.update(x[c])
            ref = pt.compute_range(qmin, qmax, symmetric)
            assert torch.allclose(got[0][c], ref[0], rtol=1e-6) and torch.allclose(got[1][c], ref[1], rtol=1e-6)


def _mse_reference_error(obs, deltas, offsets, ns):
    """expected_error as first written: dense prefix sums over all bins, one expression per term."""
    hist = obs.histogram()[0].reshape(deltas.shape[0], -1)
    lo = obs.histogram()[1].reshape(-1).double()
    hi = obs.histogram()[2].reshape(-1).double()
    c, nb = hist.shape
    w = (hi - lo) / nb
    w = torch.where(w > 0, w, torch.full_like(w, EPS))[:, None]

    def prefix(h):
        j = torch.arange(nb, dtype=torch.float64)
        zero = torch.zeros(c, 1, dtype=torch.float64)
        cums = [torch.cat([zero, (h * m).cumsum(1)], dim=1) for m in (1.0, j + 0.5, j * j + j + 1.0 / 3.0)]
        return (*cums, torch.cat([h, zero], dim=1))

    def clip_below(p, s):
        k = s.floor().clamp(0, nb).long()
        part = (s - k).clamp(0, 1)
        full = s * s * p[0].gather(1, k) - 2 * s * p[1].gather(1, k) + p[2].gather(1, k)
        return full + p[3].gather(1, k) * part.pow(3) / 3

    def mass_below(p, s):
        k = s.floor().clamp(0, nb).long()
        return p[0].gather(1, k) + p[3].gather(1, k) * (s - k).clamp(0, 1)

    fwd, rev = prefix(hist), prefix(hist.flip(1))
    s = (offsets * deltas - lo[:, None]) / w
    t = ((offsets + ns) * deltas - lo[:, None]) / w
    clip = clip_below(fwd, s) + clip_below(rev, nb - t)
    inside = (mass_below(fwd, t) - mass_below(fwd, s)).clamp_(min=0)
    return clip * w**2 + inside * deltas * deltas / 12


def test_mse_search_equals_argmin_of_reference_error():
    """expected_error (blocked, prefix sums over occupied bins only when few are occupied) is bit-identical
    to the dense formulation, and compute_range (coarse-to-fine over symmetric candidates) is its argmin."""
    for x, qmin, qmax, symmetric in _search_cases():
        obs, sparse = MseObserver(None if x.dim() == 1 else 0), MseObserver(None if x.dim() == 1 else 0)
        obs.update(x)
        sparse.update(x)
        deltas, offsets = obs.candidates(qmin, qmax, symmetric)
        assert torch.equal(sparse.expected_error(deltas, offsets, qmax - qmin),  # occupied bins alone, short rows
                           _mse_reference_error(obs, deltas, offsets, qmax - qmin))
        lo, hi = sparse.compute_range(qmin, qmax, symmetric)
        ref = _mse_reference_error(obs, deltas, offsets, qmax - qmin)
        assert torch.equal(obs.expected_error(deltas, offsets, qmax - qmin), ref)
        best = ref.argmin(dim=1, keepdim=True)
        delta, offset = deltas.gather(1, best).reshape(-1), offsets.gather(1, best).reshape(-1)
        assert torch.equal(lo.reshape(-1), (offset * delta).float())
        assert torch.equal(hi.reshape(-1), (offset * delta + (qmax - qmin) * delta).float())


def test_mse_expected_error_matches_actual_error():
    """The closed-form objective equals the mean squared error of quantizing the data (up to binning)."""
    x = torch.randn(200000, generator=_gen(14))
    obs = MseObserver()
    obs.update(x)
    for lo, hi, qmin, qmax in [(-2.0, 2.0, 0, 15), (-1.0, 3.0, 0, 255), (-4.3, 4.3, 0, 63)]:
        scale, offset = numerics.encoding_from_range(torch.tensor(lo), torch.tensor(hi), qmin, qmax, False)
        d = torch.tensor([[float(scale)]], dtype=torch.float64)
        o = torch.tensor([[float(offset) + qmin]], dtype=torch.float64)
        expected = float(obs.expected_error(d, o, qmax - qmin)) / x.numel()
        actual = _mse(x, torch.tensor(lo), torch.tensor(hi), qmin, qmax, False)
        assert expected == pytest.approx(actual, rel=0.05)


# ------------------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("scheme", ["min_max", *HIST_SCHEMES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes(scheme, dtype):
    x = (torch.randn(2, 300, generator=_gen(15)) * 2).to(dtype).requires_grad_(True)
    obs = make_observer(scheme, 0)
    obs.update(x)
    lo, hi = obs.compute_range(-128, 127, True)
    assert lo.dtype == torch.float32 and lo.shape == (2,) and lo.device == x.device
    assert torch.all(lo < 0) and torch.all(hi > 0)
    ref_lo, ref_hi = torch.aminmax(x.detach().float(), dim=1)
    assert torch.equal(obs.observed_range()[0].float(), ref_lo) and torch.equal(obs.observed_range()[1].float(), ref_hi)


# ------------------------------------------------------------------------------------------- background updates
class _InPlaceAfter(torch.nn.Module):
    """A layer whose output the next op overwrites in place (the observer must have copied it)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x):
        y = self.fc1(x)
        return self.fc2(y.mul_(0.5).add_(3.0))


@pytest.mark.parametrize("scheme", ["tf_enhanced", "percentile", "mse", "min_max"])
def test_background_calibration_equals_serial(monkeypatch, scheme):
    """compute_encodings runs weight searches and histogram updates on worker threads; the encodings equal those of
    the serial run (same order of updates per observer), also when a later op modifies an observed tensor in
    place."""
    from quantsim import QuantizationSimModel
    from quantsim import observers

    torch.manual_seed(0)
    model = _InPlaceAfter()
    data = [torch.randn(64, 16) * (1 + i) for i in range(6)]  # growing ranges: order matters
    encodings = {}
    for threads in (True, False):
        monkeypatch.setattr(observers, "BACKGROUND", threads)
        sim = QuantizationSimModel(model, quant_scheme=scheme)
        sim.compute_encodings(data, progress=False)
        encodings[threads] = {k: (q.get_scale().clone(), q.get_offset().clone()) for k, q in sim.named_quantizers()
                              if q.is_initialized()}
    assert encodings[True].keys() == encodings[False].keys() and len(encodings[True]) >= 4
    for k, (s, o) in encodings[True].items():
        assert torch.equal(s, encodings[False][k][0]) and torch.equal(o, encodings[False][k][1]), k


def test_background_calibration_reports_nan_with_the_quantizer_name():
    from quantsim import QuantizationSimModel

    torch.manual_seed(0)
    sim = QuantizationSimModel(_InPlaceAfter(), quant_scheme="tf_enhanced")
    bad = torch.randn(8, 16)
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"fc1\.output_quantizers\[0\]|input_quantizers\[0\]"):
        sim.compute_encodings([torch.randn(8, 16), bad, torch.randn(8, 16)], progress=False)


def test_background_keeps_each_observers_order_when_the_caller_helps():
    """With one pending update allowed, the submitting thread applies updates itself (its own or the oldest queued)
    while the worker runs others; each observer still gets its batches in submission order: the histograms equal
    a serial run's exactly."""
    import threading

    from quantsim.observers import Background, HistogramObserver

    torch.manual_seed(0)
    data = [(i % 3, torch.randn(200_000) * (1 + i)) for i in range(24)]  # growing ranges: order matters
    serial = [HistogramObserver() for _ in range(3)]
    for k, x in data:
        serial[k].update(x)
    threaded = [HistogramObserver() for _ in range(3)]
    threads = set()

    def update(k, x):
        threads.add(threading.current_thread().name)
        threaded[k].update(x)

    bg = Background(max_pending=1, threads=True)
    try:
        for k, x in data:
            bg.update(k, lambda x, k=k: update(k, x), x)
        bg.join()
    finally:
        bg.close()
    assert threads == {threading.current_thread().name, "quantsim-calibrate"}  # both threads did updates
    for a, b in zip(threaded, serial):
        (ha, loa, hia), (hb, lob, hib) = a.histogram(), b.histogram()
        assert torch.equal(ha, hb) and torch.equal(loa, lob) and torch.equal(hia, hib)


@pytest.mark.parametrize("memory", ["torch", "numpy", "shared"])
@pytest.mark.parametrize("write", ["add_", "relu_", "view", "out"])
def test_background_update_sees_the_tensor_as_it_was_submitted(write, memory):
    """A queued update works on a snapshot: writing the tensor in place afterwards (as a later in-place op of the
    forward may) leaves what the update sees unchanged, whichever way the write happens and whoever owns the memory
    (a numpy array's or shared memory cannot be made copy-on-write)."""
    import threading

    from quantsim.observers import Background

    x = torch.randn(1000, generator=_gen(3))
    if memory == "numpy":
        x = torch.from_numpy(x.numpy().copy())
    elif memory == "shared":
        x = x.share_memory_()
    before = x.clone()
    seen, gate = [], threading.Event()
    bg = Background(max_pending=8, threads=True)
    try:
        bg.run(gate.wait)  # the worker is busy: the update below stays queued
        bg.update("q", lambda t: seen.append(t.clone()), x)
        {"add_": lambda: x.add_(1.0), "relu_": lambda: x.relu_(), "view": lambda: x[10:20].fill_(7.0),
         "out": lambda: torch.mul(before, 3.0, out=x)}[write]()
        gate.set()
        bg.join()
    finally:
        gate.set()
        bg.close()
    assert torch.equal(seen[0], before) and not torch.equal(x, before)


def test_background_error_drops_later_updates_and_is_raised():
    """After a failed update the later ones are not applied (a serial run would have stopped there)."""
    from quantsim.observers import Background

    applied = []

    def update(x):
        if x.item() == 2:
            raise ValueError("bad batch 2")
        applied.append(x.item())

    bg = Background(max_pending=8, threads=True)
    try:
        with pytest.raises(ValueError, match="bad batch 2"):  # at a later submit or at join
            for i in range(5):
                bg.update("q", update, torch.tensor(float(i)))
            bg.join()
    finally:
        bg.close()
    assert applied == [0.0, 1.0]


def test_background_worker_ops_are_single_threaded_and_the_callers_threads_unchanged():
    """The worker splits no op over threads (the forward beside it already uses the cores) and, on Linux, runs at the
    lowest priority; torch's thread count and the priority of the calling thread are untouched."""
    import os
    import sys
    import threading

    from quantsim.observers import WORKER_NICE, Background

    linux = sys.platform.startswith("linux")
    before = torch.get_num_threads()
    nice_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) if linux else None
    seen = []

    def probe():
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) if linux else None
        seen.append((threading.current_thread().name, torch.get_num_threads(), nice))

    bg = Background(threads=True)
    try:
        bg.run(probe)
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:  # this thread takes no job until join: the worker runs it
            time.sleep(0.001)
        assert bg.map(lambda v: v * 2, [1, 2, 3]) == [2, 4, 6]
        bg.join()
    finally:
        bg.close()
    assert torch.get_num_threads() == before
    assert seen and seen[0][0] == "quantsim-calibrate"
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert seen[0][1] == 1
    if linux:
        assert seen[0][2] == max(WORKER_NICE, nice_before)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == nice_before


def test_background_calibration_is_reproducible():
    """Two calibrations of the same model on the same data give identical encodings, however the work was shared
    between the threads (a convolution's last bits could change with torch's thread count: it is left alone)."""
    from quantsim import QuantizationSimModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU6(),
                                torch.nn.Conv2d(16, 16, 3, groups=16), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1)).eval()
    data = [torch.randn(8, 3, 32, 32) for _ in range(4)]
    runs = []
    for _ in range(3):
        sim = QuantizationSimModel(model, quant_scheme="tf_enhanced")
        sim.compute_encodings(data, progress=False)
        runs.append({k: (q.get_scale(), q.get_offset()) for k, q in sim.named_quantizers() if q.is_initialized()})
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for k, (s, o) in other.items():
            assert torch.equal(s, runs[0][k][0]) and torch.equal(o, runs[0][k][1]), k


def test_compute_encodings_after_a_failed_forward_raises_it_and_a_new_call_starts_clean():
    """A callback that fails with updates still queued: its error propagates, the queued updates are dropped
    before the encodings are computed, and a later compute_encodings equals one on a fresh sim."""
    from quantsim import QuantizationSimModel

    torch.manual_seed(0)
    model = _InPlaceAfter()
    data = [torch.randn(256, 16) * (1 + i) for i in range(6)]

    def failing(m):
        for x in data:
            m(x)
        raise KeyError("callback failed")

    sim = QuantizationSimModel(model, quant_scheme="tf_enhanced")
    with pytest.raises(KeyError, match="callback failed"):
        sim.compute_encodings(failing)
    assert not any(q._observing for _, q in sim.named_quantizers())
    sim.compute_encodings(data, progress=False)
    fresh = QuantizationSimModel(model, quant_scheme="tf_enhanced")
    fresh.compute_encodings(data, progress=False)
    a, b = dict(sim.named_quantizers()), dict(fresh.named_quantizers())
    for k, q in a.items():
        if q.is_initialized():
            assert torch.equal(q.get_scale(), b[k].get_scale()) and torch.equal(q.get_offset(), b[k].get_offset()), k

"""Calibration range estimators ("observers"), AIMET v2 semantics (derivations in docs/calibration.md).

An observer sees calibration batches through `update(x)`, keeps only running statistics (min/max, and
for the histogram schemes a fixed-size histogram per channel), and at the end turns them into the
(min, max) range that numerics.encoding_from_range converts into (scale, offset).

Schemes (make_observer names):
    min_max      running min / max                               (AIMET "tf")
    tf_enhanced  SQNR grid search over a histogram                (AIMET "tf_enhanced", SqnrEncodingAnalyzer)
    percentile   [P(100-p), P(p)] of the data from the histogram  (AIMET "percentile")
    mse          range minimising expected squared error          (quantsim; see docs/calibration.md)

Observers are plain objects (transient calibration state), not nn.Modules. All statistics stay on the
device of the input; no Python loop runs over channels, elements or candidates (the final searches are
split into blocks of channels only to bound memory, like AIMET's `max_parallelism`).
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "NonFiniteError",
    "Observer",
    "MinMaxObserver",
    "HistogramObserver",
    "SqnrObserver",
    "PercentileObserver",
    "MseObserver",
    "make_observer",
    "SCHEMES",
    "DEFAULT_NUM_BINS",
]

#: Smallest step size a searched candidate may have (AIMET's _MINIMUM_SCALE).
_MIN_DELTA = float(torch.finfo(torch.float32).eps)

#: Upper bound on elements of one (channels x candidates x bins) block in the final searches.
_BLOCK_ELEMENTS = 1 << 22

#: Histogram bins per channel (AIMET v1's PDF_SIZE; AIMET v2's analyzers default to 2048, see docs/calibration.md).
DEFAULT_NUM_BINS = 512


class NonFiniteError(ValueError):
    """An observed tensor holds NaN or Inf; calibrating on it would give a meaningless encoding."""


def _describe_non_finite(x: torch.Tensor) -> str:
    """'3 NaN and 1 Inf (+Inf: 1, -Inf: 0) among 1000 values': counted only on the error path."""
    n_nan = int(torch.isnan(x).sum())
    n_pos = int((x == math.inf).sum())
    n_neg = int((x == -math.inf).sum())
    parts = []
    if n_nan:
        parts.append(f"{n_nan} NaN")
    if n_pos or n_neg:
        parts.append(f"{n_pos + n_neg} Inf (+Inf: {n_pos}, -Inf: {n_neg})")
    return f"input contains {' and '.join(parts) or 'non-finite values'} among {x.numel()} values"


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """float32/float64 view of the input (half and integer inputs are widened to float32)."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.to(torch.float32)


def _blocks(num_channels: int, per_channel_elements: int):
    """Channel slices whose (channels x per_channel_elements) stays under the memory budget."""
    step = max(1, _BLOCK_ELEMENTS // max(1, per_channel_elements))
    return [slice(i, min(i + step, num_channels)) for i in range(0, num_channels, step)]


# ===================================================================================================== base
class Observer:
    """Streaming range statistics for one quantizer: running min/max per tensor or per channel."""

    def __init__(self, channel_axis: int | None = None):
        self.channel_axis = channel_axis
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._num_batches = 0
        self._num_channels: int | None = None
        self._min: torch.Tensor | None = None  # (C,), C = 1 per-tensor
        self._max: torch.Tensor | None = None
        self._reset_stats()

    def _reset_stats(self) -> None:
        """Subclass hook: drop the scheme's own statistics."""

    @property
    def num_batches(self) -> int:
        """Number of update() calls since the last reset."""
        return self._num_batches

    # ------------------------------------------------------------------------------------------- update
    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel input as a (C, N) matrix (a view when the channel axis is already leading)."""
        axis = self.channel_axis % max(x.dim(), 1)
        c = x.shape[axis] if x.dim() else 1
        if self._num_channels is not None and c != self._num_channels:
            raise ValueError(f"observer saw {self._num_channels} channels before, now {c} (axis {axis})")
        return x.movedim(axis, 0).reshape(c, -1) if x.dim() else x.reshape(1, 1)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold one batch into the running statistics; raises NonFiniteError on NaN/Inf input."""
        x = _as_float(x.detach())
        if x.numel() == 0:
            return
        if self.channel_axis is None:
            data = x
            bmin, bmax = torch.aminmax(x)
            bmin, bmax = bmin.reshape(1), bmax.reshape(1)
        else:
            data = self._rows(x)
            bmin, bmax = torch.aminmax(data, dim=1)
        # aminmax propagates NaN and returns +-Inf, so one check on 2C numbers finds any non-finite input.
        if not bool(torch.isfinite(torch.cat([bmin, bmax])).all()):
            raise NonFiniteError(_describe_non_finite(x))
        if self._min is None:
            self._num_channels = bmin.numel()
            self._min, self._max = bmin.clone(), bmax.clone()
        else:
            self._min = torch.minimum(self._min, bmin.to(self._min.dtype))
            self._max = torch.maximum(self._max, bmax.to(self._max.dtype))
        self._update_stats(data, bmin, bmax)
        self._num_batches += 1

    def _update_stats(self, data: torch.Tensor, bmin: torch.Tensor, bmax: torch.Tensor) -> None:
        """Subclass hook: `data` is the input (per-tensor) or its (C, N) rows; bmin/bmax are (C,)."""

    # ------------------------------------------------------------------------------------------- results
    def _shaped(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(()) if self.channel_axis is None else t

    def _require_data(self) -> None:
        if self._num_batches == 0:
            raise RuntimeError(f"{type(self).__name__}: no data observed since reset; cannot compute a range")

    def observed_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw running (min, max), shape () per-tensor or (C,) per-channel, in the input's float dtype."""
        self._require_data()
        return self._shaped(self._min.clone()), self._shaped(self._max.clone())

    def compute_range(self, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) float32 for numerics.encoding_from_range on the grid [qmin, qmax]."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channel_axis={self.channel_axis}, num_batches={self._num_batches})"


class MinMaxObserver(Observer):
    """Scheme "min_max" (AIMET "tf"): the range is the running elementwise min and max."""

    def compute_range(self, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The observed (min, max) as float32; encoding_from_range widens it to include 0."""
        self._require_data()
        return self._shaped(self._min.float()), self._shaped(self._max.float())


# ===================================================================================================== histogram
class HistogramObserver(Observer):
    """Running min/max plus one `num_bins` histogram per channel over a range that contains 0.

    The first batch's range (widened to include 0) fixes the bins; later batches may widen the range up
    to `range_growth_limit` times the first range (centred on it), mass beyond that clips into the edge
    bins. When the range widens the old counts are redistributed into the new bins in proportion to
    overlap (uniform density inside a bin). Per-tensor binning is one torch.histc; per-channel binning
    is one bincount over (channel, bin) indices with the same arithmetic as histc.
    """

    def __init__(
        self, channel_axis: int | None = None, *, num_bins: int = DEFAULT_NUM_BINS, range_growth_limit: float = 3.0
    ):
        if int(num_bins) < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        if not range_growth_limit >= 1.0:
            raise ValueError(f"range_growth_limit must be >= 1 (math.inf for unlimited), got {range_growth_limit}")
        self.num_bins = int(num_bins)
        self.range_growth_limit = float(range_growth_limit)
        super().__init__(channel_axis)

    def _reset_stats(self) -> None:
        self._hist: torch.Tensor | None = None  # (C, B) float64 counts
        self._lo: torch.Tensor | None = None  # (C,) histogram range, lo <= 0 <= hi
        self._hi: torch.Tensor | None = None
        self._cap_lo: torch.Tensor | None = None  # (C,) limits of growth; cap_lo == cap_hi: not yet set
        self._cap_hi: torch.Tensor | None = None

    def _caps(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Growth limits: the range [lo, hi] scaled by range_growth_limit about its centre."""
        width = hi - lo
        if math.isinf(self.range_growth_limit):
            half = torch.where(width > 0, torch.full_like(width, math.inf), torch.zeros_like(width))
        else:
            half = width * (self.range_growth_limit / 2)
        centre = (lo + hi) / 2
        return torch.minimum(centre - half, lo), torch.maximum(centre + half, hi)

    def _update_stats(self, data: torch.Tensor, bmin: torch.Tensor, bmax: torch.Tensor) -> None:
        blo, bhi = bmin.clamp(max=0), bmax.clamp(min=0)
        if self._hist is None:
            lo, hi = blo.clone(), bhi.clone()
            cap_lo, cap_hi = self._caps(lo, hi)
            hist = torch.zeros(lo.numel(), self.num_bins, dtype=torch.float64, device=lo.device)
            changed, clip = False, False
        else:
            lo = torch.minimum(self._lo, blo.to(self._lo.dtype))
            hi = torch.maximum(self._hi, bhi.to(self._hi.dtype))
            # Channels that saw only zeros so far have no growth limit yet: this batch sets it.
            fresh = self._cap_hi <= self._cap_lo
            new_cap_lo, new_cap_hi = self._caps(lo, hi)
            cap_lo = torch.where(fresh, new_cap_lo, self._cap_lo)
            cap_hi = torch.where(fresh, new_cap_hi, self._cap_hi)
            lo, hi = torch.maximum(lo, cap_lo), torch.minimum(hi, cap_hi)
            flags = torch.stack([((lo < self._lo) | (hi > self._hi)).any(), ((bmin < lo) | (bmax > hi)).any()])
            changed, clip = flags.tolist()
            hist = _redistribute(self._hist, self._lo, self._hi, lo, hi) if changed else self._hist
        hist += self._bin(data, lo, hi, clip)
        self._hist, self._lo, self._hi, self._cap_lo, self._cap_hi = hist, lo, hi, cap_lo, cap_hi

    def _bin(self, data: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, clip: bool) -> torch.Tensor:
        """(C, B) float64 counts of this batch on the bins of [lo, hi]; out-of-range values go to edge bins."""
        nb = self.num_bins
        if self.channel_axis is None:
            lo_f, hi_f = (float(v) for v in torch.cat([lo, hi]).tolist())
            if hi_f <= lo_f:  # only zeros seen: all mass in bin 0
                h = torch.zeros(nb, dtype=torch.float64, device=data.device)
                h[0] = data.numel()
                return h.reshape(1, nb)
            if clip:
                data = data.clamp(lo_f, hi_f)
            return torch.histc(data, nb, lo_f, hi_f).to(torch.float64).reshape(1, nb)
        lo_, hi_ = lo.to(data.dtype), hi.to(data.dtype)
        width = hi_ - lo_
        width = torch.where(width > 0, width, torch.ones_like(width))
        # Same expression as torch.histc's CPU kernel: (x - min) * bins / (max - min), truncated.
        idx = (data - lo_[:, None]).mul_(nb).div_(width[:, None]).floor_().clamp_(0, nb - 1).long()
        idx += torch.arange(data.shape[0], device=data.device)[:, None] * nb
        counts = torch.bincount(idx.reshape(-1), minlength=data.shape[0] * nb)
        return counts.reshape(data.shape[0], nb).to(torch.float64)

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(counts, lo, hi): float64 counts (B,) or (C, B) on equal bins of [lo, hi] (shape () or (C,))."""
        self._require_data()
        counts = self._hist[0] if self.channel_axis is None else self._hist
        return counts.clone(), self._shaped(self._lo.clone()), self._shaped(self._hi.clone())


def _redistribute(hist: torch.Tensor, lo0: torch.Tensor, hi0: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Counts of `hist` (bins of [lo0, hi0]) moved onto the bins of [lo, hi] ⊇ [lo0, hi0] by overlap.

    The old histogram's cumulative count is piecewise linear in x (uniform mass inside a bin); the new
    bins get its differences at their edges. A zero-width old range is a point mass at lo0 (= 0).
    """
    c, nb = hist.shape
    lo0, hi0, lo, hi = (t.to(torch.float64) for t in (lo0, hi0, lo, hi))
    steps = torch.arange(nb + 1, dtype=torch.float64, device=hist.device) / nb
    edges = lo[:, None] + (hi - lo)[:, None] * steps  # (C, B+1)
    w0 = (hi0 - lo0) / nb
    degenerate = (w0 <= 0)[:, None]
    pos = (edges - lo0[:, None]) / torch.where(w0 > 0, w0, torch.ones_like(w0))[:, None]
    point = torch.where(edges > lo0[:, None], float(nb), 0.0)
    pos = torch.where(degenerate, point, pos).clamp_(0, nb)
    k = pos.floor().long().clamp_(max=nb - 1)
    cum = torch.cat([torch.zeros(c, 1, dtype=hist.dtype, device=hist.device), hist.cumsum(1)], dim=1)
    cdf = cum.gather(1, k) + (pos - k) * hist.gather(1, k)
    cdf[:, 0] = 0.0
    cdf[:, -1] = cum[:, -1]
    return cdf.diff(dim=1).clamp_(min=0)


def _search_range(lo: torch.Tensor, hi: torch.Tensor, num_steps: int):
    """AIMET's search bounds: the range widened to include 0 and to at least num_steps * eps."""
    min_v = lo.to(torch.float64).clamp(max=0)
    max_v = hi.to(torch.float64).clamp(min=0)
    return min_v, torch.maximum(max_v, min_v + _MIN_DELTA * num_steps)


# ===================================================================================================== SQNR
class SqnrObserver(HistogramObserver):
    """Scheme "tf_enhanced": AIMET v2's SqnrEncodingAnalyzer search over the histogram.

    Each (delta, offset) candidate is scored by quantize-dequantizing the bin midpoints: squared error
    times bin count, with clipped bins weighted by `gamma`; the least-noise candidate wins.
    quant_noise="uniform" scores unclipped bins by delta^2/12 per element instead (not AIMET).
    """

    def __init__(
        self,
        channel_axis: int | None = None,
        *,
        num_bins: int = DEFAULT_NUM_BINS,
        range_growth_limit: float = 3.0,
        gamma: float = 3.0,
        asymmetric_delta_candidates: int = 17,
        symmetric_delta_candidates: int = 101,
        offset_candidates: int = 21,
        quant_noise: str = "midpoint",
    ):
        if quant_noise not in ("midpoint", "uniform"):
            raise ValueError(f"quant_noise must be 'midpoint' or 'uniform', got {quant_noise!r}")
        if min(asymmetric_delta_candidates, symmetric_delta_candidates, offset_candidates) < 3:
            raise ValueError("candidate counts must be >= 3")
        self.gamma = float(gamma)
        self.asymmetric_delta_candidates = int(asymmetric_delta_candidates)
        self.symmetric_delta_candidates = int(symmetric_delta_candidates)
        self.offset_candidates = int(offset_candidates)
        self.quant_noise = quant_noise
        super().__init__(channel_axis, num_bins=num_bins, range_growth_limit=range_growth_limit)

    def candidates(self, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta, offset) candidates, float64 (C, K): AIMET v2's construction (see docs/calibration.md).

        offset is AIMET's: the grid is (k + offset) * delta for k in [0, qmax - qmin].
        """
        self._require_data()
        ns = qmax - qmin
        min_v, max_v = _search_range(self._lo, self._hi, ns)
        f64 = dict(dtype=torch.float64, device=min_v.device)
        if symmetric:
            n = self.symmetric_delta_candidates
            if qmin < 0:  # signed grid: offset fixed at qmin (= floor(-ns/2) for the symmetric grids)
                max_delta = 2 * torch.maximum(max_v, -min_v) / ns
            else:  # unsigned symmetric grid [0, ns]: offset 0 (AIMET v1's unsigned-symmetric case)
                max_delta = max_v / ns
            deltas = (max_delta[:, None] * torch.arange(1, n + 1, **f64) / (n - 1)).clamp_(min=_MIN_DELTA)
            return deltas, torch.full_like(deltas, float(qmin))
        n = self.asymmetric_delta_candidates
        max_delta = (max_v - min_v) / ns
        obs_offset = torch.round(min_v / max_delta)
        obs_min = max_delta * obs_offset
        obs_max = obs_min + max_delta * ns
        deltas = max_delta[:, None] * torch.arange(1, n + 1, **f64) / (n - 1)  # (C, n)
        n_off = min(ns + 2, self.offset_candidates)
        grid_offsets = torch.round(-ns + torch.arange(n_off - 1, **f64) * (ns / (n_off - 2)))
        offsets = torch.cat([grid_offsets.expand(min_v.numel(), -1), obs_offset[:, None]], dim=1)  # (C, n_off)
        # Clamp each candidate's range to the observed grid range, then recompute delta and offset.
        t_min = deltas[:, :, None] * offsets[:, None, :]
        t_max = t_min + deltas[:, :, None] * ns
        t_min = torch.maximum(obs_min[:, None, None], t_min)
        t_max = torch.minimum(obs_max[:, None, None], t_max)
        deltas = ((t_max - t_min) / ns).clamp_(min=_MIN_DELTA)
        offsets = torch.round(t_min / deltas)
        return deltas.flatten(1), offsets.flatten(1)

    def expected_noise(self, deltas: torch.Tensor, offsets: torch.Tensor, num_steps: int) -> torch.Tensor:
        """(C, K) expected noise of each candidate on this histogram (the SQNR objective), float64.

        Bin midpoints m are quantize-dequantized with y = m / delta - offset, q = round(y): the squared
        error is delta^2 (clamp(q, 0, num_steps) - y)^2, times gamma where q was clamped; float32 like AIMET.
        """
        hist = self._hist
        c, nb = hist.shape
        lo, hi = self._lo.to(torch.float64), self._hi.to(torch.float64)
        w = (hi - lo) / nb
        mids = (lo + w / 2)[:, None] + w[:, None] * torch.arange(nb, dtype=torch.float64, device=hist.device)
        mids, counts = mids.float(), hist.float()
        # Empty bins add nothing: keep only the occupied ones (padded with zero counts), which matters for
        # per-channel weights with few values per channel (depthwise kernels fill a handful of bins).
        occupied = counts > 0
        keep = int(occupied.sum(1).max())
        if keep < nb:
            order = torch.argsort(occupied.to(torch.uint8), dim=1, descending=True, stable=True)[:, :keep]
            mids, counts, nb = mids.gather(1, order), counts.gather(1, order), keep
        out = torch.empty(c, deltas.shape[1], dtype=torch.float64, device=hist.device)
        for blk in _blocks(c, deltas.shape[1] * nb):
            d, o = deltas[blk, :, None].float(), offsets[blk, :, None].float()
            y = mids[blk, None, :] / d
            y -= o  # (c, K, B)
            q = torch.round(y)
            qc = q.clamp(0, num_steps)
            clipped = q != qc if (self.gamma != 1.0 or self.quant_noise == "uniform") else None
            e2 = qc.sub_(y).square_()  # squared error in units of delta^2
            if self.quant_noise == "uniform":
                e2 = torch.where(clipped, e2 * self.gamma, torch.full_like(e2, 1.0 / 12.0))
            elif clipped is not None:
                e2 = torch.where(clipped, e2 * self.gamma, e2)
            noise = torch.matmul(e2, counts[blk, :, None]).squeeze(-1)
            out[blk] = noise.double() * deltas[blk] ** 2
        return out

    def compute_range(self, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid range (offset * delta, (offset + qmax - qmin) * delta) of the least-noise candidate."""
        deltas, offsets = self.candidates(qmin, qmax, symmetric)
        ns = qmax - qmin
        best = self.expected_noise(deltas, offsets, ns).argmin(dim=1, keepdim=True)
        delta, offset = deltas.gather(1, best).squeeze(1), offsets.gather(1, best).squeeze(1)
        min_ = offset * delta
        return self._shaped(min_.float()), self._shaped((min_ + ns * delta).float())


# ===================================================================================================== percentile
class PercentileObserver(HistogramObserver):
    """Scheme "percentile": range [P(100 - p), P(p)] of the observed values; p = 100 is plain min/max.

    Percentiles come from the streaming histogram by inverting its piecewise-linear cumulative count,
    so they are within one bin width of the exact sample percentile while the range has not grown.
    """

    def __init__(
        self,
        channel_axis: int | None = None,
        percentile: float = 100.0,
        *,
        num_bins: int = DEFAULT_NUM_BINS,
        range_growth_limit: float = 3.0,
    ):
        self.percentile = percentile
        super().__init__(channel_axis, num_bins=num_bins, range_growth_limit=range_growth_limit)

    @property
    def percentile(self) -> float:
        """Clipping percentile p in [50, 100] (AIMET's accepted range)."""
        return self._percentile

    @percentile.setter
    def percentile(self, value: float) -> None:
        value = float(value)
        if not 50.0 <= value <= 100.0:
            raise ValueError(f"percentile must be in [50, 100], got {value}")
        self._percentile = value

    def compute_range(self, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(100-p), P(p)) float32, clamped to the observed min/max; the grid does not matter here."""
        self._require_data()
        if self._percentile >= 100.0:
            return self._shaped(self._min.float()), self._shaped(self._max.float())
        hist = self._hist
        c, nb = hist.shape
        cum = hist.cumsum(1)
        total = cum[:, -1:]
        p = self._percentile / 100.0
        targets = torch.cat([total * (1.0 - p), total * p], dim=1)  # (C, 2)
        k = torch.searchsorted(cum, targets).clamp_(max=nb - 1)  # first bin whose cumulative count reaches it
        before = cum.gather(1, k) - hist.gather(1, k)
        frac = ((targets - before) / hist.gather(1, k).clamp(min=1e-300)).clamp_(0, 1)
        lo, hi = self._lo.to(torch.float64), self._hi.to(torch.float64)
        values = lo[:, None] + (hi - lo)[:, None] / nb * (k + frac)
        mins, maxs = self._min.to(torch.float64), self._max.to(torch.float64)
        values = torch.maximum(torch.minimum(values, maxs[:, None]), mins[:, None])
        return self._shaped(values[:, 0].float()), self._shaped(values[:, 1].float())


# ===================================================================================================== MSE
def _clip_error_below(prefix: tuple[torch.Tensor, ...], s: torch.Tensor) -> torch.Tensor:
    """sum over the histogram mass below s of (s - u)^2, in bin units, mass uniform inside each bin.

    prefix = (P0, P1, P2, n): (C, B+1) prefix sums of n_j, n_j (j + 1/2), n_j (j^2 + j + 1/3) and the
    counts padded with a 0; s: (C, K) thresholds in bin units (bin j covers [j, j + 1)).
    """
    p0, p1, p2, n = prefix
    nb = n.shape[1] - 1
    k = s.floor().clamp(0, nb).long()
    part = (s - k).clamp(0, 1)
    full = s * s * p0.gather(1, k) - 2 * s * p1.gather(1, k) + p2.gather(1, k)
    return full + n.gather(1, k) * part.pow(3) / 3


def _mass_below(prefix: tuple[torch.Tensor, ...], s: torch.Tensor) -> torch.Tensor:
    """Histogram mass below s (bin units): the piecewise-linear cumulative count."""
    p0, _, _, n = prefix
    nb = n.shape[1] - 1
    k = s.floor().clamp(0, nb).long()
    return p0.gather(1, k) + n.gather(1, k) * (s - k).clamp(0, 1)


def _prefix_sums(hist: torch.Tensor) -> tuple[torch.Tensor, ...]:
    c, nb = hist.shape
    j = torch.arange(nb, dtype=torch.float64, device=hist.device)
    zero = torch.zeros(c, 1, dtype=torch.float64, device=hist.device)
    cums = [torch.cat([zero, (hist * m).cumsum(1)], dim=1) for m in (1.0, j + 0.5, j * j + j + 1.0 / 3.0)]
    return (*cums, torch.cat([hist, zero], dim=1))


class MseObserver(HistogramObserver):
    """Scheme "mse": grid range minimising the expected squared error on the histogram.

    Error of a grid [g_lo, g_hi] with step delta = clipping error (exact for mass uniform inside each
    bin) + delta^2 / 12 per value inside the grid. Candidates: asymmetric, every pair of clip points
    (min * i/K, max * j/K), i, j = 1..K; symmetric, delta = delta_max * k/K, k = 1..K (min_max is k = K).
    """

    def __init__(
        self,
        channel_axis: int | None = None,
        *,
        num_bins: int = DEFAULT_NUM_BINS,
        range_growth_limit: float = 3.0,
        asymmetric_candidates: int = 64,
        symmetric_candidates: int = 256,
    ):
        if min(asymmetric_candidates, symmetric_candidates) < 1:
            raise ValueError("candidate counts must be >= 1")
        self.asymmetric_candidates = int(asymmetric_candidates)
        self.symmetric_candidates = int(symmetric_candidates)
        super().__init__(channel_axis, num_bins=num_bins, range_growth_limit=range_growth_limit)

    def candidates(self, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta, offset) float64 (C, K) candidates; the grid is (k + offset) * delta, k in [0, qmax - qmin]."""
        self._require_data()
        ns = qmax - qmin
        min_v, max_v = _search_range(self._lo, self._hi, ns)
        f64 = dict(dtype=torch.float64, device=min_v.device)
        if symmetric:
            kk = self.symmetric_candidates
            # smallest delta whose grid [qmin, qmax] * delta covers [min_v, max_v] (= min_max's scale)
            cover = max_v / qmax if qmax > 0 else torch.zeros_like(max_v)
            if qmin < 0:
                cover = torch.maximum(cover, min_v / qmin)
            deltas = (cover[:, None] * torch.arange(1, kk + 1, **f64) / kk).clamp_(min=_MIN_DELTA)
            return deltas, torch.full_like(deltas, float(qmin))
        kk = self.asymmetric_candidates
        frac = torch.arange(1, kk + 1, **f64) / kk
        lows = (min_v[:, None] * frac)[:, :, None]  # (C, K, 1)
        highs = (max_v[:, None] * frac)[:, None, :]  # (C, 1, K)
        deltas = ((highs - lows) / ns).clamp_(min=_MIN_DELTA)
        offsets = torch.round(lows / deltas)
        return deltas.flatten(1), offsets.flatten(1)

    def expected_error(self, deltas: torch.Tensor, offsets: torch.Tensor, num_steps: int) -> torch.Tensor:
        """(C, K) float64 expected sum of squared errors of each candidate grid on this histogram."""
        hist = self._hist
        c, nb = hist.shape
        lo, hi = self._lo.to(torch.float64), self._hi.to(torch.float64)
        w = (hi - lo) / nb
        # A zero-width histogram holds only zeros: any grid represents them exactly, bin width is moot.
        w = torch.where(w > 0, w, torch.full_like(w, _MIN_DELTA))[:, None]
        fwd, rev = _prefix_sums(hist), _prefix_sums(hist.flip(1))
        out = torch.empty(c, deltas.shape[1], dtype=torch.float64, device=hist.device)
        for blk in _blocks(c, deltas.shape[1] * 8):
            d, o = deltas[blk], offsets[blk]
            s = (o * d - lo[blk, None]) / w[blk]  # grid ends in bin units
            t = ((o + num_steps) * d - lo[blk, None]) / w[blk]
            f = tuple(a[blk] for a in fwd)
            r = tuple(a[blk] for a in rev)
            clip = _clip_error_below(f, s) + _clip_error_below(r, nb - t)
            inside = (_mass_below(f, t) - _mass_below(f, s)).clamp_(min=0)
            out[blk] = clip * w[blk] ** 2 + inside * d * d / 12
        return out

    def compute_range(self, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid range (offset * delta, (offset + qmax - qmin) * delta) of the least-error candidate."""
        deltas, offsets = self.candidates(qmin, qmax, symmetric)
        ns = qmax - qmin
        best = self.expected_error(deltas, offsets, ns).argmin(dim=1, keepdim=True)
        delta, offset = deltas.gather(1, best).squeeze(1), offsets.gather(1, best).squeeze(1)
        min_ = offset * delta
        return self._shaped(min_.float()), self._shaped((min_ + ns * delta).float())


# ===================================================================================================== factory
SCHEMES = {
    "min_max": MinMaxObserver,
    "tf_enhanced": SqnrObserver,
    "percentile": PercentileObserver,
    "mse": MseObserver,
}


def make_observer(scheme: str, channel_axis: int | None = None, **kwargs) -> Observer:
    """Observer for a calibration scheme name; kwargs go to its constructor (e.g. percentile=99.9)."""
    try:
        cls = SCHEMES[scheme]
    except (KeyError, TypeError):
        raise ValueError(f"unknown calibration scheme {scheme!r}; expected one of {sorted(SCHEMES)}") from None
    return cls(channel_axis, **kwargs)

"""The smallest stored adapter whose validation metric stays within a tolerance (``compress`` search).

The caller supplies two callbacks over a candidate ``(components, bits)`` -- ``components`` the global
component budget (how many of the ranked components are kept, 0..total), ``bits`` 0 (float32), 8 or 4:

* ``size(components, bits)`` -> stored bytes, cheap (no evaluation) and non-decreasing in ``components``;
* ``evaluate(components, bits)`` -> the validation metric of that candidate.

:func:`search_budget` bisects the budget per bit width, assuming the metric does not get worse as
components are added (true up to noise; the walked curve is returned so a violation is visible).
8 bit is walked first (round-to-nearest int8 is close to lossless, so it sets a tight byte bound),
then 4 bit and float, each only below the byte size already reached: their walks usually end after
one evaluation. A bisection stops once its bracket is within ``resolution`` of its upper end
(default 1/16: the chosen budget is at most ~6 % above the smallest passing one).
:func:`search_bits` tries each bit width at a fixed set of ranks.

Pure Python; the callbacks own every tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Candidate:
    components: int
    bits: int
    stored_bytes: int
    metric: float
    within: bool
    # a lower confidence bound of ``metric`` (higher-is-better) from a paired test against the uncompressed
    # adapter on the same examples; ``within`` is judged on it, so validation noise cannot pass a candidate
    metric_bound: float | None = None
    # the candidate's factors (and head) were re-tuned after trimming (lora_ops.compress.recover)
    recovered: bool = False

    def row(self) -> dict[str, float | int | bool]:
        return asdict(self)


def within_tolerance(metric: float, reference: float, tolerance: float, higher_is_better: bool = True) -> bool:
    """``metric`` at most ``tolerance`` points (1/100 of the metric's unit) worse than ``reference``;
    for a lower-is-better metric (a loss) the tolerance is a relative one, in percent."""
    if higher_is_better:
        return metric >= reference - tolerance / 100.0 - 1e-12
    return metric <= reference * (1.0 + tolerance / 100.0) + 1e-12


#: ``bound(components, bits)``: called right after ``evaluate`` for the same candidate; the lower confidence
#: bound of its metric (see :class:`Candidate`), or None to judge the point estimate
Bound = Callable[[int, int], float | None]


class _Walker:
    def __init__(self, size: Callable[[int, int], int], evaluate: Callable[[int, int], float], reference: float,
                 tolerance: float, higher_is_better: bool, bound: Bound | None = None) -> None:
        self.size, self.evaluate, self.bound = size, evaluate, bound
        self.reference, self.tolerance, self.higher = reference, tolerance, higher_is_better
        self.curve: list[Candidate] = []
        self._seen: dict[tuple[int, int], Candidate] = {}

    def test(self, components: int, bits: int) -> Candidate:
        key = (components, bits)
        if key not in self._seen:
            metric = float(self.evaluate(components, bits))
            low = self.bound(components, bits) if self.bound is not None else None
            judged = metric if low is None else low
            cand = Candidate(components, bits, int(self.size(components, bits)), metric,
                             within_tolerance(judged, self.reference, self.tolerance, self.higher), low)
            self._seen[key] = cand
            self.curve.append(cand)
        return self._seen[key]


def _largest_below(size: Callable[[int, int], int], bits: int, total: int, limit: int) -> int:
    """The largest budget in [0, total] whose size is < ``limit`` (-1 if none)."""
    lo, hi = -1, total + 1  # size(lo) < limit (virtual), size(hi) >= limit (virtual)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size(mid, bits) < limit:
            lo = mid
        else:
            hi = mid
    return lo


#: the order bit widths are walked in (0 = float32 factors)
WALK_ORDER = (8, 4, 0)


def search_budget(size: Callable[[int, int], int], evaluate: Callable[[int, int], float], total: int,
                  bits_options: Sequence[int], reference: float, tolerance: float,
                  higher_is_better: bool = True, resolution: float = 1 / 16, bound: Bound | None = None
                  ) -> tuple[Candidate | None, list[Candidate]]:
    """The candidate with the fewest stored bytes within the tolerance (None if none) and the walked curve."""
    if total < 0:
        raise ValueError(f"total components must be >= 0, got {total}")
    walker = _Walker(size, evaluate, reference, tolerance, higher_is_better, bound)
    order = sorted(set(bits_options), key=lambda b: WALK_ORDER.index(b) if b in WALK_ORDER else len(WALK_ORDER))
    best: Candidate | None = None
    for bits in order:
        top = total if best is None else _largest_below(size, bits, total, best.stored_bytes)
        if top < 0:
            continue
        if not walker.test(top, bits).within:
            continue
        lo, hi = -1, top  # lo fails (virtual), hi passes
        while hi - lo > max(1, int(hi * resolution)):
            mid = (lo + hi) // 2
            if walker.test(mid, bits).within:
                hi = mid
            else:
                lo = mid
        found = walker.test(hi, bits)
        if best is None or found.stored_bytes < best.stored_bytes:
            best = found
    return best, walker.curve


def search_bits(size: Callable[[int, int], int], evaluate: Callable[[int, int], float], components: int,
                bits_options: Sequence[int], reference: float, tolerance: float,
                higher_is_better: bool = True, bound: Bound | None = None
                ) -> tuple[Candidate | None, list[Candidate]]:
    """At a fixed budget, the bit width with the fewest stored bytes within the tolerance."""
    walker = _Walker(size, evaluate, reference, tolerance, higher_is_better, bound)
    best: Candidate | None = None
    for bits in sorted(set(bits_options), key=lambda b: (b if b else 32)):
        cand = walker.test(components, bits)
        if cand.within and (best is None or cand.stored_bytes < best.stored_bytes):
            best = cand
            break  # the cheapest width that passes: wider ones only store more
    return best, walker.curve

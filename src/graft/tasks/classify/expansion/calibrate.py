"""Calibrating the new rows of a widened head against the old ones.

New rows trained on few images tend to produce logits on a different scale from the old rows, so
they either steal old-class images or never fire. Calibration rescales and shifts the new logits
only (``a * z_new + b``, folded into the new rows' weights and bias), so the old rows, and in
frozen mode the old logits, stay exactly as they were:

- ``norm``: weight aligning, ``a`` = mean norm of the old rows / mean norm of the new rows.
- ``bias``: that, then ``a`` and ``b`` fitted on held-out data to minimise class-balanced
  cross-entropy (BiC, Wu et al. 2019).

Both are then capped by a guard: ``b`` is lowered until the new rows take at most
``max_old_loss`` of the old-class held-out samples that the old rows classify correctly with a
probability of at least ``guard_confidence`` times that of the median correct sample.

The held-out samples are few (a validation split), so the share the guard measures is an estimate:
``old_taken_bound`` is its one-sided 95 % upper bound (Clopper-Pearson), what the share on new
images may reach. With 126 samples, one taken is 0.8 % measured and up to 3.7 % bound; on
``benchmarks/expand.py`` the old classes lost up to 4.3 points on test where val measured 1.6 %.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graft.tasks.classify.expansion.negatives import balanced_weights

PRIOR_WEIGHT = 0.01  # pull of the fitted scale towards the weight-norm ratio (and of the shift towards 0)
MAX_SCALE_CHANGE = 4.0  # the fitted scale stays within this factor of the weight-norm ratio (or of 1)
BOUND_CONFIDENCE = 0.95  # of old_taken_bound


@dataclass
class Calibration:
    method: str
    scale: float = 1.0
    shift: float = 0.0
    old_samples: int = 0  # old-class held-out samples it was checked on
    old_taken: float | None = None  # share of them the new rows take after calibration
    old_taken_bound: float | None = None  # its one-sided 95% upper bound, given how few samples measured it
    new_samples: int = 0
    notes: list[str] = field(default_factory=list)

    def apply(self, block: nn.Linear) -> None:
        with torch.no_grad():
            block.weight.mul_(self.scale)
            block.bias.mul_(self.scale).add_(self.shift)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def norm_ratio(old_weight: torch.Tensor, new_weight: torch.Tensor) -> float:
    old_weight, new_weight = old_weight.detach(), new_weight.detach()
    return float(old_weight.norm(dim=1).mean() / new_weight.norm(dim=1).mean().clamp_min(1e-12))


def fit_calibration(
    old_logits: torch.Tensor,
    new_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    method: str,
    norm_scale: float,
    max_old_loss: float,
    guard_confidence: float = 0.5,
) -> Calibration:
    """``old_logits [M, K]`` (fixed), ``new_logits [M, N]`` before calibration, ``labels [M]`` in
    ``0..K+N-1``: held-out samples of old and new classes."""
    k = old_logits.shape[1]
    cal = Calibration(method, old_samples=int((labels < k).sum()), new_samples=int((labels >= k).sum()))
    if method == "none":
        return cal
    cal.scale = norm_scale
    if method == "bias":
        if cal.new_samples == 0 or cal.old_samples == 0:
            cal.notes.append("no held-out samples of the " + ("new" if cal.new_samples == 0 else "old") + " classes to fit on: weight aligning only")
        else:
            cal.scale, cal.shift = _fit_scale_shift(old_logits, new_logits, labels, norm_scale)
    _guard(cal, old_logits, new_logits, labels, max_old_loss, guard_confidence)
    return cal


def _fit_scale_shift(old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, scale: float) -> tuple[float, float]:
    old, new = old.double(), new.double()
    weights = balanced_weights(torch.bincount(labels, minlength=old.shape[1] + new.shape[1]).double())
    log_a = torch.tensor(float(torch.tensor(scale).log()), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_a, b], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    prior = float(torch.tensor(scale).log())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.cat([old, log_a.exp() * new + b], 1)
        # When the held-out samples are already separated, cross-entropy alone would grow the scale
        # without bound: a weak pull towards the aligned norms keeps the new rows on the old rows' scale.
        loss = F.cross_entropy(logits, labels, weight=weights) + PRIOR_WEIGHT * ((log_a - prior) ** 2 + 0.01 * b**2)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    a = float(log_a.detach().exp())
    # Within a factor of the aligned norms, or of leaving the rows as trained: new rows trained much
    # longer than the old ones have larger norms for a reason, and aligning alone would silence them.
    return min(max(a, min(scale, 1.0) / MAX_SCALE_CHANGE), max(scale, 1.0) * MAX_SCALE_CHANGE), float(b.detach())


def _guard(cal: Calibration, old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, max_old_loss: float, confidence: float) -> None:
    k = old.shape[1]
    is_old = labels < k
    if not is_old.any():
        return
    o, n, y = old[is_old].double(), cal.scale * new[is_old].double(), labels[is_old]
    # Only the samples the old rows get right with some confidence bind: one ambiguous image (a 3
    # that looks like an 8) would otherwise silence a new class on everything. Confidence is
    # relative to the median correct sample's, so a model that is never very sure is still guarded.
    p = o.softmax(1).max(1).values
    right = o.argmax(1) == y
    if right.any():
        right &= p >= confidence * p[right].median()
    # A correctly classified old sample is taken when the shift exceeds its margin.
    margins, _ = (o.max(1).values - n.max(1).values)[right].sort()
    allowed = int(max_old_loss * len(margins))
    if allowed < len(margins) and cal.shift >= float(margins[allowed]):
        limit = float(margins[allowed]) - 1e-4 * max(1.0, abs(float(margins[allowed])))
        cal.notes.append(f"shift lowered from {cal.shift:.4g} to {limit:.4g} so the new rows take at most {100 * max_old_loss:g}% of the old-class held-out samples")
        cal.shift = limit
    taken = (n.max(1).values + cal.shift > o.max(1).values).double()
    cal.old_taken = float(taken.mean())
    cal.old_taken_bound = upper_bound(int(taken.sum()), len(taken))


def upper_bound(successes: int, trials: int, confidence: float = BOUND_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen ``successes`` times in ``trials``: the
    rate p at which seeing at most ``successes`` has probability ``1 - confidence``."""
    if trials <= 0:
        return 1.0
    if successes >= trials:
        return 1.0

    def at_most(p: float) -> float:  # P(X <= successes), X ~ Binomial(trials, p), summed in log space
        log_p, log_q = math.log(p), math.log1p(-p)
        return sum(math.exp(math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1) + i * log_p + (trials - i) * log_q) for i in range(successes + 1))

    low, high = successes / trials, 1.0
    for _ in range(60):  # bisection: at_most falls as p rises
        mid = (low + high) / 2
        if mid <= 0.0 or at_most(mid) > 1 - confidence:
            low = mid
        else:
            high = mid
    return high

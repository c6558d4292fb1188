"""Time to quality, shared by the accuracy and detection benchmarks.

A *point* is one model a recipe had at some wall-clock time: ``{"seconds", "val_<metric>",
"<split>_<metric>"}``. A recipe's figure at a budget of T seconds is the reported-split score of
its model with the best *validation* score among those it had by T: what a user who chooses by
validation would keep. Nothing here looks at the reported split to choose.
"""

from __future__ import annotations

Curve = list[tuple[float, float, float]]  # (seconds, val score, reported score), val strictly rising


def envelope(points: list[dict], report: str, metric: str) -> Curve:
    """(seconds, val, reported) at each time a recipe gets a model better on validation."""
    out: Curve = []
    for p in sorted(points, key=lambda p: (p["seconds"], -p[f"val_{metric}"])):
        if not out or p[f"val_{metric}"] > out[-1][1]:
            out.append((p["seconds"], p[f"val_{metric}"], p[f"{report}_{metric}"]))
    return out


def at(curve: Curve, seconds: float) -> float | None:
    """A recipe's reported score at a wall-clock budget: that of its best-on-validation model by then."""
    had = [c for c in curve if c[0] <= seconds]
    return had[-1][2] if had else None


def reach(curve: Curve, target: float) -> float | None:
    """The first budget at which the recipe's chosen model scores ``target`` or more."""
    return next((s for s, _, m in curve if m >= target - 1e-9), None)


def race(peer: Curve, ours: Curve) -> dict:
    """The figures of one race: each side's best, the time each needs for the peer's best, the
    speed-up (peer's time / ours; None where graft never gets there), and the smallest margin of
    graft over the peer at equal wall time (from the moment both have a model)."""
    peer_best, our_best = max(m for _, _, m in peer), max(m for _, _, m in ours)
    peer_time, our_time = reach(peer, peer_best), reach(ours, peer_best)
    grid = sorted({s for s, _, _ in peer + ours if s >= max(peer[0][0], ours[0][0])})
    margins = [(s, at(ours, s) - at(peer, s)) for s in grid]
    worst = min(margins, key=lambda x: x[1]) if margins else (None, None)
    return {
        "peer_best": round(peer_best, 4), "peer_seconds_to_best": peer_time,
        "graft_best": round(our_best, 4), "graft_seconds_to_peer_best": our_time,
        "peer_seconds_to_graft_best": reach(peer, our_best),
        "speedup": round(peer_time / our_time, 2) if our_time and peer_time else None,
        "worst_margin_at_equal_time": None if worst[1] is None else round(worst[1], 4), "worst_margin_seconds": worst[0],
    }


def draw(ax, points: list[dict], report: str, metric: str, colour: str, label: str, until: float) -> None:
    """A recipe's curve as a step line (its chosen model's score against time), its points faint."""
    curve = envelope(points, report, metric)
    if not curve:
        return
    xs = [s for s, _, _ in curve] + [until]
    ys = [m for _, _, m in curve] + [curve[-1][2]]
    ax.step(xs, ys, where="post", color=colour, label=label, linewidth=2)
    ax.scatter([p["seconds"] for p in points], [p[f"{report}_{metric}"] for p in points], s=12, color=colour, alpha=0.35)


def save(fig, path, dpi: int) -> None:
    """Lay out, write (making the folder) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)

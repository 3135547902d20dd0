"""compare.png (GRA per arm, one bar per loss, interval whiskers, the 0.5 line) and compare_paired.png
(the paired differences with their intervals, the 0 line); with several seeds each seed's own value is a
dot beside the mean (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from cwpo_ray.comparison.markdown import seed_name


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subtitle(title: str, seeds: list, what: str) -> str:
    """The title, and with several seeds which ones: "mean over seeds 0/1/2, one dot per seed"."""
    return title if len(seeds) < 2 else f"{title}\n{what} {'/'.join(seed_name(s) for s in seeds)}, one dot per seed"


def bar_chart(agg: list[dict], seeds: list, path: Path, title: str) -> None:
    """GRA per arm x loss (rows of aggregate.arm_rows)."""
    import numpy as np

    plt = pyplot()
    several = len(seeds) > 1
    arms = list(dict.fromkeys(r["arm"] for r in agg))
    losses = list(dict.fromkeys(r["loss"] for r in agg))
    width = 0.8 / max(len(losses), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(arms) + 2, 3.6))
    dots = []
    for j, loss in enumerate(losses):
        xs, ys, errs = [], [], [[], []]
        for i, arm in enumerate(arms):
            r = next((r for r in agg if r["arm"] == arm and r["loss"] == loss and r["gra"] is not None), None)
            if r is None:
                continue
            xs.append(i + (j - (len(losses) - 1) / 2) * width)
            ys.append(r["gra"])
            errs[0].append(max(r["gra"] - (r["gra_lo"] if r["gra_lo"] is not None else r["gra"]), 0))
            errs[1].append(max((r["gra_hi"] if r["gra_hi"] is not None else r["gra"]) - r["gra"], 0))
            vals = [v for v in (r["gra_per_seed"].get(s) for s in seeds) if v is not None] if several else []
            # each seed's GRA, spread a little across the bar so equal values stay visible
            step = width / (2 * max(len(vals), 1))
            dots += [(xs[-1] + (k - (len(vals) - 1) / 2) * step, v) for k, v in enumerate(vals)]
        ax.bar(xs, ys, width=width, yerr=np.array(errs), capsize=3, label=loss)
    if dots:
        ax.plot([x for x, _ in dots], [y for _, y in dots], "o", ms=3.5, color="black", alpha=0.7, label="one seed")
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("GRA vs SFT start: mean over seeds\n(95% hierarchical CI)" if several
                  else "GRA vs SFT start (95% CI)")
    ax.set_ylim(0, 1)
    ax.set_title(subtitle(title, seeds, "mean over seeds"), fontsize=9)
    ax.legend(title="loss", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def paired_chart(pairs: list[dict], seeds: list, path: Path, title: str) -> None:
    """The paired differences (rows of aggregate.paired_rows), one line each."""
    plt = pyplot()
    several = len(seeds) > 1
    by_judge = len({p["judge"] for p in pairs}) > 1
    labels = [f"{p['a']} - {p['b']} ({p['loss']}" + (f", {p['judge']})" if by_judge else ")") for p in pairs]
    ys = list(range(len(pairs)))[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(pairs) + 1.4))
    ax.errorbar([p["diff"] for p in pairs], ys, fmt="o", capsize=3, label="mean over seeds" if several else None,
                xerr=[[p["diff"] - p["lo"] for p in pairs], [p["hi"] - p["diff"] for p in pairs]])
    if several:  # each seed's own difference, a small dot on the contrast's line
        dots = [(v, y) for p, y in zip(pairs, ys) for v in p["per_seed"].values() if v is not None]
        ax.plot([v for v, _ in dots], [y for _, y in dots], "o", ms=3.5, color="black", alpha=0.7, label="one seed")
        ax.legend(fontsize=7, loc="best")
    ax.axvline(0.0, color="grey", lw=1, ls="--")
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel("GRA difference (95% hierarchical bootstrap over seeds and prompts)" if several
                  else "GRA difference (95% paired bootstrap)")
    ax.set_title(subtitle(title, seeds, "over seeds"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

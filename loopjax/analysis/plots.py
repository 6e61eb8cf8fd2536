"""PNG plots of the analysis results (matplotlib's Agg canvas, imported only when a plot is drawn).

Every function takes NumPy-convertible arrays or ``EvalPoint`` lists and a path, writes one PNG and returns the
path. No pyplot: figures are built on an Agg canvas, so no global backend is switched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_convergence(rel_change_Tk, path, *, title: str = "per-layer convergence") -> Path:
    """Relative change ‖h_{t,l} − h_{t−1,l}‖/‖h_{t,l}‖ [T−1, k] against the loop t (log y), one curve per layer."""
    c = np.asarray(rel_change_Tk, np.float64)
    fig = _figure(5, 3.5)
    ax = fig.add_subplot()
    t = np.arange(2, c.shape[0] + 2)
    for layer in range(c.shape[1]):
        ax.plot(t, np.maximum(c[:, layer], 1e-12), marker="o", label=f"layer {layer}")
    ax.set_yscale("log")
    ax.set_xlabel("loop t")
    ax.set_ylabel("relative change")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def plot_attention_change(change_TkN, path, *, heads: Sequence[int] | None = None,
                          title: str = "attention change (JS, bits)") -> Path:
    """Heatmaps of attention change [T−1, k, N] between consecutive loops: loop × head, one panel per layer."""
    c = np.asarray(change_TkN, np.float64)
    n_t, k, n = c.shape
    heads = list(range(n)) if heads is None else list(heads)
    fig = _figure(2.2 + 2.2 * k, 3.2)
    axes = fig.subplots(1, k, squeeze=False)[0]
    vmax = max(float(c.max()), 1e-12)
    for layer, ax in enumerate(axes):
        im = ax.imshow(c[:, layer], aspect="auto", origin="lower", vmin=0.0, vmax=vmax, cmap="viridis",
                       extent=(-0.5, n - 0.5, 1.5, n_t + 1.5))
        ax.set_xticks(range(n), [str(h) for h in heads])
        ax.set_xlabel("head")
        ax.set_ylabel("loop t")
        ax.set_title(f"layer {layer}")
    fig.colorbar(im, ax=list(axes))
    fig.suptitle(title)
    return _save(fig, path)


def pca_2d(points_PD) -> np.ndarray:
    """Project points [P, D] on their top two principal components: [P, 2]."""
    x = np.asarray(points_PD, np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T if vt.shape[0] >= 2 else np.concatenate([x @ vt[:1].T, np.zeros((len(x), 1))], 1)


def plot_trajectory_pca(layer_TkBSD, path, *, batch: int = 0, position: int = -1,
                        title: str | None = None) -> Path:
    """One token's path through the k layer points of every loop, projected by PCA: the cyclic picture."""
    h_all = np.asarray(layer_TkBSD, np.float64)
    position = range(h_all.shape[3])[position]
    h = h_all[:, :, batch, position]  # [T, k, D]
    n_t, k, d = h.shape
    xy = pca_2d(h.reshape(n_t * k, d)).reshape(n_t, k, 2)
    fig = _figure(5, 4.5)
    ax = fig.add_subplot()
    flat = xy.reshape(-1, 2)
    ax.plot(flat[:, 0], flat[:, 1], color="0.7", lw=0.8, zorder=1)
    for layer in range(k):
        ax.scatter(xy[:, layer, 0], xy[:, layer, 1], s=25, zorder=2, color=f"C{layer}", label=f"layer {layer}")
        ax.annotate("end", xy[-1, layer], fontsize=7)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title or f"trajectory of token {position} (batch {batch})")
    ax.legend()
    return _save(fig, path)


def plot_exit_depth_text(pieces: Sequence[str], exit_steps, path, *, n_loops: int | None = None,
                         per_line: int = 16, title: str = "exit depth per token") -> Path:
    """The text ``pieces`` (one string per token) on backgrounds coloured by each token's exit step."""
    from matplotlib import colormaps

    steps = np.asarray(exit_steps).reshape(-1)
    if len(pieces) != len(steps):
        raise ValueError(f"len(pieces)={len(pieces)}: must equal len(exit_steps)={len(steps)}")
    n_loops = int(steps.max()) if n_loops is None else n_loops
    per_line = max(1, min(per_line, len(pieces)))
    cmap = colormaps["viridis"]
    n_lines = max(1, -(-len(pieces) // per_line))
    fig = _figure(0.8 * per_line, 0.5 * n_lines + 0.9)
    ax = fig.add_subplot()
    ax.set_xlim(0, per_line)
    ax.set_ylim(n_lines, -0.5)
    ax.axis("off")
    for i, (piece, step) in enumerate(zip(pieces, steps)):
        frac = (step - 1) / max(n_loops - 1, 1)
        ax.text(i % per_line + 0.5, i // per_line + 0.5, piece.replace("\n", "⏎") or " ", ha="center",
                va="center", fontsize=9, family="monospace",
                bbox=dict(boxstyle="round,pad=0.2", fc=cmap(0.15 + 0.8 * frac), ec="none"))
    ax.set_title(f"{title} (dark = 1, bright = {n_loops})")
    return _save(fig, path)


def plot_pareto(points, path, *, cost: str = "flops_per_token", title: str = "accuracy per FLOP") -> Path:
    """Accuracy against ``cost`` (log x) for ``EvalPoint`` s of one or more models; each model's frontier drawn."""
    from loopjax.analysis.efficiency import pareto_frontier

    fig = _figure(6, 4.2)
    ax = fig.add_subplot()
    models = list(dict.fromkeys(p.model for p in points))
    for i, name in enumerate(models):
        mine = [p for p in points if p.model == name]
        ax.scatter([getattr(p, cost) for p in mine], [p.accuracy for p in mine], color=f"C{i}", s=18,
                   alpha=0.6, label=name)
        front = pareto_frontier(mine, cost)
        ax.step([getattr(p, cost) for p in front], [p.accuracy for p in front], where="post", color=f"C{i}")
    front = pareto_frontier(points, cost)
    ax.plot([getattr(p, cost) for p in front], [p.accuracy for p in front], "k--", lw=0.8, label="all: frontier")
    ax.set_xscale("log")
    ax.set_xlabel(cost.replace("_", " "))
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_layer_specialisation(profiles: dict[str, dict], path, *,
                              title: str = "layer specialisation") -> Path:
    """Per core layer: E[n] (left) and mean memory gate value, local and global bank (right), one line per model.

    ``profiles`` maps a model's name to ``{"expected_steps": [L] or None, "gate_local": [L] or None,
    "gate_global": [L] or None}``; a model without per-layer loops or memory simply has no line in that panel.
    """
    if not profiles:
        raise ValueError("profiles={}: must hold at least one model")
    fig = _figure(9.0, 3.4)
    ax_en, ax_gate = fig.subplots(1, 2)
    markers = {"gate_local": ("o", "-", "local"), "gate_global": ("s", "--", "global")}
    drawn_en = drawn_gate = False
    for i, (name, prof) in enumerate(profiles.items()):
        color = f"C{i}"
        en = prof.get("expected_steps")
        if en is not None:
            ax_en.plot(np.arange(1, len(en) + 1), en, "o-", color=color, label=name)
            drawn_en = True
        for key, (marker, style, bank) in markers.items():
            g = prof.get(key)
            if g is not None:
                ax_gate.plot(np.arange(1, len(g) + 1), g, marker=marker, linestyle=style, color=color,
                             label=f"{name} {bank}")
                drawn_gate = True
    for ax, drawn, ylabel, empty in ((ax_en, drawn_en, "E[n] (iterations)", "no per-layer loops"),
                                     (ax_gate, drawn_gate, "mean gate value", "no memory banks")):
        ax.set_xlabel("core layer")
        ax.set_ylabel(ylabel)
        if drawn:
            ax.legend(fontsize="small")
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    ax_gate.set_ylim(0, 1)
    if drawn_en:
        ax_en.set_ylim(bottom=1)
    fig.suptitle(title)
    return _save(fig, path)

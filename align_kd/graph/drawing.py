"""Figures of the alignment plan (matplotlib on an Agg canvas; pyplot is never touched): the two-column
bipartite picture, side-by-side panels, the plan heat-map and the plan's evolution over training."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from .analysis import _as_graph, _is_run_like, _label, _resolve, _sides, alignment_graph, load_run

__all__ = [
    "draw_alignment",
    "draw_plan_heatmap",
    "draw_plan_evolution",
    "draw_panels",
]

TEACHER_COLOR = "#1f77b4"  # blue
STUDENT_COLOR = "#d95f02"  # orange
EDGE_COLOR = "#3a3a3a"


def _new_figure(figsize, dpi, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, **kw)
    FigureCanvasAgg(fig)
    return fig


def _check_out_path(path: Any) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p = Path(path)
    ext = p.suffix.lower().lstrip(".")
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if ext not in supported:
        raise ValueError(
            f"Expected an output path ending in an image format suffix ({', '.join(sorted(supported))}; "
            f"e.g. .png, .svg, .pdf) but got {str(path)!r}."
        )
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format=path.suffix.lower().lstrip("."), dpi=fig.dpi)
    return path


def _graph_title(G: nx.Graph) -> str:
    parts = []
    strategy, name = G.graph.get("strategy", ""), G.graph.get("name", "")
    if strategy:
        parts.append(str(strategy))
    if name and name != strategy:
        parts.append(str(name))
    t = " / ".join(parts)
    acc = G.graph.get("test_acc")
    if isinstance(acc, (int, float)) and math.isfinite(acc):
        t += f" (test acc {acc:.4g})" if t else f"test acc {acc:.4g}"
    return t


def _alignment_size(G: nx.Graph) -> tuple[float, float]:
    n = max(G.graph.get("T", 1), G.graph.get("S", 1), len(_sides(G)[0]), len(_sides(G)[1]))
    return 6.4, float(np.clip(0.3 * n + 1.6, 3.2, 16.0))


def _draw_alignment_into(fig, rect, G: nx.Graph, *, title: str | None, show_shapes: bool | str = "auto",
                         lw_max: float | None = None) -> Any:
    """Draw the two-column alignment picture of ``G`` inside ``rect`` (figure fraction x0, y0, w, h)."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba

    t, s = _sides(G)
    T, S = len(t), len(s)
    W, H = fig.get_size_inches()
    x0, y0, rw, rh = rect
    cell_w, cell_h = rw * W, rh * H  # inches
    top_in = 0.55 + (0.3 if title else 0.0)  # headers (+ title) above the first node
    bot_in = 0.15
    ax_h_in = max(cell_h - top_in - bot_in, 0.5)
    ax = fig.add_axes((x0, y0 + bot_in / H, rw, ax_h_in / H))
    ax.set_axis_off()

    def ypos(k, n):
        return 0.5 if n == 1 else k / (n - 1)

    yt = [ypos(i, T) for i in range(T)]
    ys = [ypos(j, S) for j in range(S)]
    spacing_pt = ax_h_in * 72.0 / max(T - 1, S - 1, 1)  # tightest vertical gap between nodes (points)
    fs = float(np.clip(0.62 * spacing_pt, 5.0, 10.5))
    if lw_max is None:
        lw_max = float(np.clip(0.45 * spacing_pt, 1.5, 7.0))
    msize = float(np.clip(0.55 * spacing_pt, 4.0, 9.0))
    if show_shapes == "auto":
        show_shapes = max(T, S) <= 16
    pad = 0.02

    # edges: width and opacity proportional to lambda, heaviest on top
    segs, lws, cols = [], [], []
    edges = []
    for u, v, d in G.edges(data=True):
        if G.nodes[u].get("side") == "student":
            u, v = v, u
        edges.append((float(d.get("weight", 1.0)), int(G.nodes[u]["depth"]), int(G.nodes[v]["depth"])))
    for w, i, j in sorted(edges):
        wc = min(max(w, 0.0), 1.0)
        segs.append([(0.0, yt[i]), (1.0, ys[j])])
        lws.append(lw_max * wc)
        cols.append(to_rgba(EDGE_COLOR, 0.25 + 0.7 * wc))
    if segs:
        ax.add_collection(LineCollection(segs, linewidths=lws, colors=cols, capstyle="round", zorder=1))
    ax.plot([0.0] * T, yt, "o", ms=msize, color=TEACHER_COLOR, mec="white", mew=0.8, zorder=3, clip_on=False)
    ax.plot([1.0] * S, ys, "o", ms=msize, color=STUDENT_COLOR, mec="white", mew=0.8, zorder=3, clip_on=False)
    ax.set_xlim(-pad, 1 + pad)
    ax.set_ylim(1 + pad, -pad)  # depth grows downwards

    def text_for(n):
        lab = _label(G, n)
        shp = G.nodes[n].get("shape", "")
        return f"{lab}  ({shp.replace('x', '×')})" if show_shapes and shp else lab

    off = msize * 0.5 + 4
    texts = []
    for n, y in zip(t, yt):
        texts.append(ax.annotate(text_for(n), (0.0, y), xytext=(-off, 0), textcoords="offset points",
                                 ha="right", va="center", fontsize=fs, color="#111111", annotation_clip=False))
    for n, y in zip(s, ys):
        texts.append(ax.annotate(text_for(n), (1.0, y), xytext=(off, 0), textcoords="offset points",
                                 ha="left", va="center", fontsize=fs, color="#111111", annotation_clip=False))
    hfs = fs + 1.0
    texts.append(ax.annotate(f"Teacher (T={T})", (0.0, 0.0), xytext=(0, 0.32 * 72), textcoords="offset points",
                             ha="center", va="bottom", fontsize=hfs, fontweight="bold", color=TEACHER_COLOR,
                             annotation_clip=False))
    texts.append(ax.annotate(f"Student (S={S})", (1.0, 0.0), xytext=(0, 0.32 * 72), textcoords="offset points",
                             ha="center", va="bottom", fontsize=hfs, fontweight="bold", color=STUDENT_COLOR,
                             annotation_clip=False))
    if title:
        ax.set_title(title, fontsize=hfs + 1.0, pad=0.62 * 72)

    # fit the labels horizontally: measure them and shrink the node columns' axes to leave room
    renderer = fig.canvas.get_renderer()
    dpi = fig.dpi
    for _ in range(4):
        lt = max(tx.get_window_extent(renderer).width for tx in texts[:T]) / dpi + (off + 6) / 72
        ls = max(tx.get_window_extent(renderer).width for tx in texts[T:T + S]) / dpi + (off + 6) / 72
        head = max(tx.get_window_extent(renderer).width for tx in texts[T + S:T + S + 2]) / dpi / 2 + 0.05
        lt, ls = max(lt, head), max(ls, head)
        if lt + ls <= 0.62 * cell_w:
            break
        scale = 0.62 * cell_w / (lt + ls)
        for tx in texts[:T + S]:
            tx.set_fontsize(max(tx.get_fontsize() * scale, 3.0))
    ax_w = max(cell_w - lt - ls, 0.3 * cell_w)
    # the two column headers are centred on the columns: shrink them if they would touch
    heads = texts[T + S:T + S + 2]
    hw = sum(tx.get_window_extent(renderer).width for tx in heads) / dpi / 2 + 0.3
    if hw > ax_w:
        for tx in heads:
            tx.set_fontsize(max(tx.get_fontsize() * ax_w / hw, 4.0))
    ax.set_position((x0 + lt / W, y0 + bot_in / H, ax_w / W, ax_h_in / H))
    return ax, lw_max


def _lw_legend(fig, lw_max: float, fs: float = 8.5) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=EDGE_COLOR, alpha=0.25 + 0.7 * v, lw=lw_max * v, solid_capstyle="round")
               for v in (0.1, 0.5, 1.0)]
    fig.legend(handles, ["λ = 0.1", "λ = 0.5", "λ = 1"], loc="lower center", ncol=3, frameon=False,
               fontsize=fs, handlelength=2.5, title="line width ∝ λ", title_fontsize=fs,
               bbox_to_anchor=(0.5, 0.0))


def draw_alignment(graph_or_run: Any, path: str | os.PathLike, *, title: str | None = None,
                   figsize: tuple[float, float] | None = None, dpi: int = 200, threshold: float = 1e-3,
                   show_shapes: bool | str = "auto", legend: bool = True) -> Path:
    """Bipartite alignment picture: teacher layers in the left column, student layers in the right.

    Depth runs top to bottom and both columns span the same height; each edge (``lambda >
    threshold``) is a line whose width (and opacity) is proportional to lambda; teacher nodes are
    blue, student nodes orange, each labelled with its layer name (and feature shape when
    ``show_shapes`` -- "auto" shows them for up to 16 layers per side). A line-width key sits at
    the bottom when ``legend``. The image is exactly ``figsize * dpi`` pixels (no tight bbox); the
    format comes from the suffix of ``path`` (png, svg, pdf, ...). Default title: the run's strategy
    / name and final test accuracy when known. Returns ``path``.
    """
    p = _check_out_path(path)
    G = _as_graph(graph_or_run, threshold)
    if figsize is None:
        figsize = _alignment_size(G)
    fig = _new_figure(figsize, dpi)
    if title is None:
        title = _graph_title(G) or None
    leg_in = 0.55 if legend else 0.0
    H = figsize[1]
    rect = (0.02, leg_in / H, 0.96, 1.0 - (leg_in + 0.1) / H)
    _, lw_max = _draw_alignment_into(fig, rect, G, title=title, show_shapes=show_shapes)
    if legend:
        _lw_legend(fig, lw_max)
    return _save(fig, p)


def draw_panels(runs: Sequence[Any], path: str | os.PathLike, titles: Sequence[str] | None = None, *,
                ncols: int | None = None, figsize: tuple[float, float] | None = None, dpi: int = 200,
                threshold: float = 1e-3, show_shapes: bool | str = False, legend: bool = True) -> Path:
    """Several alignment pictures side by side (e.g. the best run of each strategy), one figure.

    ``runs`` are graphs, runs (object/dict/path) or plans; ``titles`` default to each run's
    strategy / name (or "run k"). Panels are laid out in ``ncols`` columns (default: all in one row
    up to 4, then rows of 4). Returns ``path``.
    """
    p = _check_out_path(path)
    graphs = [_as_graph(r, threshold) for r in runs]
    if not graphs:
        raise ValueError("Expected at least one run for draw_panels() but got none.")
    if titles is not None and len(titles) != len(graphs):
        raise ValueError(f"Expected {len(graphs)} titles (one per run) but got {len(titles)}.")
    n = len(graphs)
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    if figsize is None:
        h = max(_alignment_size(g)[1] for g in graphs)
        figsize = (4.6 * ncols, h * nrows + (0.55 if legend else 0.0))
    fig = _new_figure(figsize, dpi)
    W, H = figsize
    leg = (0.55 if legend else 0.0) / H
    cw, ch = 1.0 / ncols, (1.0 - leg - 0.05 / H) / nrows
    # one line-width scale for all panels, so widths are comparable across panels
    n_max = max(max(len(_sides(g)[0]), len(_sides(g)[1])) for g in graphs)
    lw_max = float(np.clip(0.45 * max(ch * H - 1.0, 0.5) * 72 / max(n_max - 1, 1), 1.5, 7.0))
    for k, G in enumerate(graphs):
        r, c = divmod(k, ncols)
        ttl = titles[k] if titles is not None else (_graph_title(G) or f"run {k + 1}")
        rect = (c * cw + 0.01, leg + (nrows - 1 - r) * ch, cw - 0.02, ch)
        _draw_alignment_into(fig, rect, G, title=ttl, show_shapes=show_shapes, lw_max=lw_max)
    if legend:
        _lw_legend(fig, lw_max)
    return _save(fig, p)


def _heatmap_ax(ax, p: np.ndarray, tl, sl, *, vmax: float, annotate: bool, cmap: str, fs: float,
                xticks: bool = True, yticks: bool = True):
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    norm = Normalize(0.0, vmax)
    im = ax.imshow(p, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    T, S = p.shape
    ax.set_xticks(range(S))
    ax.set_yticks(range(T))
    if xticks:
        rot = 45 if max(len(x) for x in sl) > 3 else 0
        ax.set_xticklabels(sl, rotation=rot, ha="right" if rot else "center", rotation_mode="anchor", fontsize=fs)
    else:
        ax.set_xticklabels([])
    ax.set_yticklabels(tl if yticks else [], fontsize=fs)
    ax.tick_params(length=2)
    if annotate:
        cm = colormaps[cmap]
        for i in range(T):
            for j in range(S):
                r, g, b, _ = cm(norm(p[i, j]))
                lum = 0.299 * r + 0.587 * g + 0.114 * b
                ax.text(j, i, f"{p[i, j]:.2f}", ha="center", va="center", fontsize=max(fs - 1.5, 4.5),
                        color="white" if lum < 0.5 else "black")
    return im


def draw_plan_heatmap(plan_or_run: Any, path: str | os.PathLike, *, teacher_layers=None, student_layers=None,
                      title: str | None = None, figsize: tuple[float, float] | None = None, dpi: int = 200,
                      annotate: bool | None = None, cmap: str = "viridis") -> Path:
    """The (T, S) plan as a heat-map: rows teacher layers (top = shallowest), columns student layers.

    Tick labels are the layer names; colour scale is lambda in [0, max(1, max lambda)] with a
    colour bar. Values are printed in the cells when ``annotate`` (default: when T*S <= 150).
    Accepts a plan (+ optional names), a graph or a run. Returns ``path``.
    """
    p_out = _check_out_path(path)
    p, tl, sl = _resolve(plan_or_run, teacher_layers, student_layers)
    T, S = p.shape
    if annotate is None:
        annotate = T * S <= 150
    if title is None:
        if isinstance(plan_or_run, nx.Graph):
            title = _graph_title(plan_or_run)
        elif _is_run_like(plan_or_run):
            title = _graph_title(alignment_graph(plan_or_run))
        title = ("plan λ: " + title) if title else "plan λ (columns sum to 1)"
    if figsize is None:
        lw = 0.075 * max(len(x) for x in tl)
        figsize = (float(np.clip(2.0 + lw + 0.5 * S, 4.0, 16.0)), float(np.clip(1.6 + 0.38 * T, 3.0, 16.0)))
    fig = _new_figure(figsize, dpi, layout="constrained")
    ax = fig.add_subplot()
    fs = float(np.clip(figsize[1] * 72 / max(T, 1) * 0.45, 5.0, 9.5))
    im = _heatmap_ax(ax, p, tl, sl, vmax=max(1.0, float(p.max())), annotate=annotate, cmap=cmap, fs=fs)
    ax.set_xlabel("student layer")
    ax.set_ylabel("teacher layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="λ", shrink=0.9)
    return _save(fig, p_out)


def draw_plan_evolution(run: Any, path: str | os.PathLike, *, mode: str = "heatmaps", max_panels: int = 6,
                        figsize: tuple[float, float] | None = None, dpi: int = 200, cmap: str = "viridis") -> Path:
    """How the plan changed during training, from the run's ``history`` (entries with a ``plan``).

    ``mode="heatmaps"``: small multiples of the plan heat-map at up to ``max_panels`` epochs evenly
    spread over the history (first and last included), titled with epoch and test accuracy, one
    shared colour bar. ``mode="lines"``: one small panel per student layer showing lambda[i, j]
    over epochs for every teacher layer i (colour = teacher depth). Raises ValueError if the
    history holds no plans. Returns ``path``.
    """
    p_out = _check_out_path(path)
    r = load_run(run)
    hp = r.history_plans()
    if not hp:
        raise ValueError("Expected the run's history to contain per-epoch 'plan' entries but found none.")
    if mode not in ("heatmaps", "lines"):
        raise ValueError(f"Expected mode 'heatmaps' or 'lines' but got {mode!r}.")
    T, S = r.T, r.S
    tl, sl = r.teacher_layers, r.student_layers
    head = _graph_title(alignment_graph(r))
    if mode == "heatmaps":
        k = min(max_panels, len(hp))
        idx = sorted(set(int(round(v)) for v in np.linspace(0, len(hp) - 1, k)))
        k = len(idx)
        ncols = k if k <= 4 else math.ceil(k / 2)
        nrows = math.ceil(k / ncols)
        if figsize is None:
            lw = 0.075 * max(len(x) for x in tl)
            pw, ph = float(np.clip(0.8 + 0.32 * S, 1.8, 5.0)), float(np.clip(0.9 + 0.26 * T, 1.8, 6.0))
            figsize = (min(lw + 1.2 + ncols * pw, 20.0), min(0.6 + nrows * ph, 16.0))
        fig = _new_figure(figsize, dpi, layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        vmax = max(1.0, max(float(hp[q][1].max()) for q in idx))
        fs = float(np.clip(figsize[1] / nrows * 72 / max(T, 1) * 0.42, 4.5, 8.5))
        annotate = T * S <= 40 and k <= 4
        im = None
        for a, q in enumerate(idx):
            ax = axes[a]
            ep, pl, acc = hp[q]
            im = _heatmap_ax(ax, pl, tl, sl, vmax=vmax, annotate=annotate, cmap=cmap, fs=fs,
                             xticks=a >= (nrows - 1) * ncols or a + ncols >= k, yticks=a % ncols == 0)
            ax.set_title(f"epoch {ep}" + (f"  acc {acc:.4g}" if acc is not None else ""), fontsize=fs + 1.5)
        for ax in axes[k:]:
            ax.set_axis_off()
        fig.colorbar(im, ax=list(axes[:k]), label="λ", shrink=0.9)
        fig.suptitle(("plan evolution: " + head) if head else "plan evolution", fontsize=10)
    else:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        nrows = math.ceil(S / 4)
        ncols = math.ceil(S / nrows)
        if figsize is None:
            figsize = (min(1.4 + 3.0 * ncols, 16.0), min(0.8 + 2.2 * nrows, 16.0))
        fig = _new_figure(figsize, dpi, layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        epochs = [e for e, _, _ in hp]
        stack = np.stack([pl for _, pl, _ in hp])  # (E, T, S)
        cm = colormaps[cmap]
        norm = Normalize(0, max(T - 1, 1))
        for j in range(S):
            ax = axes[j]
            for i in range(T):
                ax.plot(epochs, stack[:, i, j], color=cm(norm(i)), lw=1.3, marker="o" if len(epochs) <= 12 else None,
                        ms=2.5)
            ax.set_title(f"student {sl[j]}", fontsize=9)
            ax.set_ylim(-0.03, max(1.0, float(stack.max())) + 0.03)
            ax.grid(alpha=0.3, lw=0.5)
            ax.tick_params(labelsize=7.5)
            if j % ncols == 0:
                ax.set_ylabel("λ", fontsize=9)
            ax.set_xlim(min(epochs) - 0.3, max(epochs) + 0.3)
            if j + ncols >= S:
                ax.set_xlabel("epoch", fontsize=9)
            else:
                ax.tick_params(labelbottom=False)
            if j % ncols:
                ax.tick_params(labelleft=False)
        for ax in axes[S:]:
            ax.set_axis_off()
        sm = ScalarMappable(norm=norm, cmap=cm)
        cb = fig.colorbar(sm, ax=list(axes[:S]), shrink=0.9, label="teacher layer")
        step = max(1, math.ceil(T / 12))
        cb.set_ticks(list(range(0, T, step)))
        cb.set_ticklabels(tl[::step], fontsize=7)
        fig.suptitle(("λ per student layer over epochs: " + head) if head else "λ per student layer over epochs",
                     fontsize=10)
    return _save(fig, p_out)


"""The collector's figures: the paper-style LaTeX table and the PNG heatmap of one transfer matrix."""

from pathlib import Path

from histokt import __version__, atomic
from histokt.results import paper
from histokt.results.matrix import MISSING, Matrix, Stat, diag_text, title

# ---- LaTeX ----------------------------------------------------------------------------------------------------

_TEX_SPECIAL = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
}


def _tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(c, c) for c in text)


def _tex_value(st: Stat) -> str:
    """HistoKT's Latex/latex_table.py style: mean$_{std}$ (in %)."""
    return f"{100 * st.test:.2f}$_{{{100 * st.std:.2f}}}$" if st.std is not None else f"{100 * st.test:.2f}"


def _shade(gain: float, best: float, worst: float) -> str:
    """Green for a gain over the diagonal, red otherwise (as HistoKT), stronger with the size of the gain
    or loss relative to the column's largest (15 to 60 % colour, so the number stays legible)."""
    if gain > 0:
        return f"green!{round(15 + 45 * gain / best)}" if best > 0 else "green!15"
    return f"red!{round(15 + 45 * -gain / -worst)}" if worst < 0 else "red!15"


def matrix_tex(m: Matrix) -> str:
    """A tabular fragment: \\input it in a document with \\usepackage[table]{xcolor}."""
    d = lambda name: _tex_escape(paper.display(name))
    gains = {t: [g for s in m.rows if s != t and (g := m.gain(s, t)) is not None] for t in m.cols}
    lines = [
        f"% histokt {__version__} collect: {title(m)}, test top-1 (%) mean$_{{std}}$ over seeds; rows = "
        "source, columns = target.",
        f"% Bold diagonal: {diag_text(m.init)}. Off-diagonal cells shaded green (gain) or red (loss) "
        "against it; gray: no result.",
        "% Needs \\usepackage[table]{xcolor} (xcolor with colortbl).",
        f"\\begin{{tabular}}{{l|{'c' * len(m.cols)}}}",
        "\\hline",
        " & ".join(["src $\\backslash$ tgt", *(f"\\textbf{{{d(t)}}}" for t in m.cols)]) + " \\\\",
        "\\hline",
    ]
    for s in m.rows:
        cells = [f"\\textbf{{{d(s)}}}"]
        for t in m.cols:
            planned, st = m.at(s, t)
            if not planned:
                cells.append("")
            elif s == t:
                cells.append("---" if st is None else f"\\textbf{{{_tex_value(st)}}}")
            elif st is None:
                cells.append("\\cellcolor{gray!25}---")
            elif (g := m.gain(s, t)) is None:
                cells.append(_tex_value(st))  # no diagonal to compare with
            else:
                colour = _shade(g, max(gains[t], default=0.0), min(gains[t], default=0.0))
                cells.append(f"\\cellcolor{{{colour}}}{_tex_value(st)}")
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\hline", "\\end{tabular}", ""]
    return "\n".join(lines)


# ---- heatmap --------------------------------------------------------------------------------------------------


def heatmap(m: Matrix, path: Path) -> None:
    """The paper-style figure: test top-1 per cell, coloured by the gain over the target's diagonal."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    nr, nc = len(m.rows), len(m.cols)
    gain = np.full((nr, nc), np.nan)
    for i, s in enumerate(m.rows):
        for j, t in enumerate(m.cols):
            planned, st = m.at(s, t)
            if planned and st is not None:
                gain[i, j] = 0.0 if s == t else (m.gain(s, t) if m.gain(s, t) is not None else np.nan)
    finite = np.abs(gain[np.isfinite(gain)])
    lim = max(float(finite.max()) if finite.size else 0.0, 0.5)
    cmap = colormaps["RdYlGn"].with_extremes(bad="white")
    # A fixed layout in inches (one draw; bbox_inches="tight" or a layout engine would draw it twice or more)
    xlabels, ylabels = [paper.display(t) for t in m.cols], [paper.display(s) for s in m.rows]
    rotate = nc > 5 or max(map(len, xlabels), default=0) > 10
    left = 0.65 + 0.085 * max(map(len, ylabels), default=1)
    bottom = 0.55 + (0.06 * max(map(len, xlabels), default=1) if rotate else 0.2)
    top, right, cw, ch = 0.95, 1.35, 1.0, 0.62
    width = max(left + cw * nc + right, 7.0)
    left += (width - left - cw * nc - right) / 2  # a small matrix sits in the middle of the title's width
    height = bottom + ch * nr + top
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((left / width, bottom / height, cw * nc / width, ch * nr / height))
    cax = fig.add_axes(((left + cw * nc + 0.15) / width, bottom / height, 0.18 / width, ch * nr / height))
    image = ax.imshow(np.ma.masked_invalid(gain), cmap=cmap, norm=Normalize(-lim, lim), aspect="auto")
    small = 7 if nc > 6 else 8
    for i, s in enumerate(m.rows):
        for j, t in enumerate(m.cols):
            planned, st = m.at(s, t)
            if not planned:
                continue
            if st is None:
                ax.add_patch(
                    Rectangle(
                        (j - 0.5, i - 0.5), 1, 1, facecolor="0.85", edgecolor="0.55", hatch="///", linewidth=0, zorder=2
                    )
                )
                ax.text(j, i, f"{MISSING}\nmissing", ha="center", va="center", fontsize=small, color="0.3")
                continue
            dark = np.isfinite(gain[i, j]) and abs(gain[i, j]) > 0.75 * lim
            colour = "white" if dark else "black"
            ax.text(
                j,
                i - 0.1,
                f"{100 * st.test:.2f}",
                ha="center",
                va="center",
                fontsize=small + 2,
                color=colour,
                fontweight="bold" if s == t else "normal",
            )
            std = f"±{100 * st.std:.2f}" if st.std is not None else f"n={st.n}"
            ax.text(j, i + 0.22, std, ha="center", va="center", fontsize=small, color=colour)
    for j, t in enumerate(m.cols):
        if t in m.rows:
            ax.add_patch(
                Rectangle(
                    (j - 0.5, m.rows.index(t) - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5, zorder=3
                )
            )
    ax.set_xticks(range(nc), xlabels, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_yticks(range(nr), ylabels)
    ax.set_xlabel("target", fontweight="bold")
    ax.set_ylabel("source", fontweight="bold")
    ax.set_xticks(np.arange(-0.5, nc, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, nr, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    bar = fig.colorbar(image, cax=cax)
    bar.set_label("gain over the diagonal (points)", fontsize=9)
    fig.text(
        0.5,
        1 - 0.12 / height,
        f"{title(m)}: test top-1 (%), mean ± std over seeds",
        ha="center",
        va="top",
        fontsize=12,
        fontweight="bold",
    )
    fig.text(
        0.5,
        1 - 0.42 / height,
        f"outlined diagonal: {diag_text(m.init)}\ncolour: gain over that diagonal; hatched: no result yet",
        ha="center",
        va="top",
        fontsize=8,
        color="0.3",
    )
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})


# ---- distillation ---------------------------------------------------------------------------------------------

"""The figures' shared look: a style per method, one legend under the panels, PNG and PDF
(eval.report and eval.tasks.report)."""
from pathlib import Path


def style_of(methods):
    import matplotlib.pyplot as plt
    colors = plt.get_cmap("tab10").colors
    markers = "osD^v<>pX*"
    return {m: dict(color="black" if m == "dense" else colors[i % len(colors)],
                    marker="*" if m == "dense" else markers[i % len(markers)],
                    linestyle="--" if m == "dense" else "-")
            for i, m in enumerate(methods)}


def save_figure(fig, stem: Path, suffix: str) -> list:
    paths = []
    for ext in ("png", "pdf"):
        path = stem.with_name(f"{stem.name}_{suffix}.{ext}")
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


def legend_below(fig, axes):
    """One legend for every panel, in a row under them (beside them it left a wide margin)."""
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncols=min(len(handles), 4 * len(axes)), frameon=False)

"""A picture of a query and its results: images, scores and titles in a grid."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from towerrec.retrieval.hits import Hit
from towerrec.retrieval.load import ItemIndex

QUERY_COLOUR = "#1f77b4"
COLD_COLOUR = "#d62728"


def _panel(ax, image: np.ndarray | None, caption: str, edge: str | None) -> None:
    if image is None:
        ax.set_facecolor("#eeeeee")
        ax.text(0.5, 0.5, "no image", ha="center", va="center", transform=ax.transAxes, fontsize=7)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(edge is not None)
        if edge is not None:
            spine.set_edgecolor(edge)
            spine.set_linewidth(3)
    ax.set_title(caption, fontsize=7)


def _caption(lines: list[str], width: int = 18) -> str:
    return "\n".join(textwrap.shorten(line, width=width, placeholder="…") for line in lines if line)


def result_grid(
    index: ItemIndex,
    query: list[str],
    hits: list[Hit],
    title: str | None = None,
    columns: int = 6,
) -> Figure:
    """A figure with the query items (framed blue) on the first row(s) and the results below.

    Cold items (never bought in training) are framed red. Each result shows its rank, score and title,
    and for history queries the history item it is most similar to.

    Args:
        index: the loaded export (for images and titles).
        query: the query item ids: one item, or a purchase history.
        hits: the results.
        title: the figure title.
        columns: panels per row.
    """
    query = list(query)[-columns * 2 :]  # long histories: the most recent items
    q_rows = -(-len(query) // columns)
    r_rows = max(1, -(-len(hits) // columns))
    fig = Figure(figsize=(1.6 * columns, 2.0 * (q_rows + r_rows) + 0.4), layout="constrained")
    axes = fig.subplots(q_rows + r_rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for j, item_id in enumerate(query):
        ax = axes[j // columns, j % columns]
        ax.set_axis_on()
        q = index.describe(item_id)
        cold = " (cold)" if q.is_cold else ""
        _panel(ax, index.image(item_id), _caption([f"query{cold}", q.item_id, q.title]), QUERY_COLOUR)
    for j, hit in enumerate(hits):
        ax = axes[q_rows + j // columns, j % columns]
        ax.set_axis_on()
        lines = [f"#{j + 1}  {hit.score:.3f}" + (" cold" if hit.is_cold else ""), hit.item_id, hit.title]
        if hit.because is not None:
            lines.append(f"like {hit.because}")
        _panel(ax, index.image(hit.item_id), _caption(lines), COLD_COLOUR if hit.is_cold else None)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def save_grid(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write the figure as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path

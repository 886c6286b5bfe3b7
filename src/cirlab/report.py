"""A self-contained HTML report: the results table, training curves, and example queries with
their top results (the correct one marked). Images are embedded, so the file works offline."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cirlab.data.records import RetrievalSplit  # noqa: E402
from cirlab.files import atomic_write_bytes, atomic_write_text, png_bytes  # noqa: E402


@dataclass
class Example:
    reference: int
    text: str
    target: int
    ranked: list[int]
    hits: list[bool]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_training_curves(metrics_files: dict[str, Path], out: Path) -> None:
    """Training loss and validation R@1 against the step, one line per run."""
    figure, (loss_axis, recall_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, path in metrics_files.items():
        records = read_metrics(path)
        losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
        recalls = [(r["step"], r["val"]["R@1"]) for r in records if "R@1" in r.get("val", {})]
        if losses:
            loss_axis.plot(*zip(*losses), label=name)
        if recalls:
            recall_axis.plot(*zip(*recalls), marker="o", label=name)
    loss_axis.set(xlabel="step", ylabel="training loss", title="training loss")
    recall_axis.set(xlabel="step", ylabel="R@1 (%)", title="validation R@1")
    for axis in (loss_axis, recall_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(out, buffer.getvalue())


def rank_examples(scores: torch.Tensor, split: RetrievalSplit, query_indices: list[int], k: int = 5) -> list[Example]:
    """Top-k gallery images for the chosen queries (own reference removed, as the protocol does)."""
    examples = []
    labels = torch.as_tensor(split.labels)
    for row, index in zip(scores, query_indices):
        query = split.queries[index]
        row = row.clone()
        row[query.reference] = float("-inf")
        ranked = row.topk(k).indices.tolist()
        hits = [bool(labels[i] == labels[query.target]) for i in ranked]
        examples.append(Example(query.reference, query.text, query.target, ranked, hits))
    return examples


def _image_tag(path: Path, caption: str, css_class: str = "") -> str:
    data = base64.b64encode(png_bytes(Image.open(path).convert("RGB"))).decode("ascii")
    return (f'<figure class="{css_class}"><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.query { display: flex; align-items: center; gap: .6rem; margin: 1rem 0; flex-wrap: wrap; }
figure { margin: 0; text-align: center; font-size: .8rem; }
figure img { width: 96px; height: 96px; image-rendering: pixelated; border: 3px solid #e2e2e2; }
figure.hit img { border-color: #1a9c3a; } figure.reference img { border-color: #888; }
.text { font-weight: 600; min-width: 14rem; }
"""


def write_report(out: Path, title: str, table_markdown: str, curves_png: Path | None,
                 split: RetrievalSplit, examples: dict[str, list[Example]]) -> None:
    """`examples` maps a model name to its ranked examples (the same queries for every model)."""
    rows = [line for line in table_markdown.splitlines() if line.startswith("|") and "---" not in line]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    table = "<table>" + "".join(
        "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>" for c in row)
        + "</tr>" for i, row in enumerate(cells)) + "</table>"
    protocol = "".join(f"<p>{html.escape(line)}</p>" for line in table_markdown.splitlines()
                       if line and not line.startswith("|"))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>", table, protocol]
    if curves_png is not None:
        data = base64.b64encode(Path(curves_png).read_bytes()).decode("ascii")
        parts.append(f'<h2>Training curves</h2><img src="data:image/png;base64,{data}" alt="training curves">')
    for model_name, model_examples in examples.items():
        parts.append(f"<h2>Example test queries: {html.escape(model_name)}</h2>"
                     "<p>Grey frame: reference image. Green frame: a correct result (the target's scene).</p>")
        for example in model_examples:
            figures = [_image_tag(split.image_paths[example.reference], "reference", "reference"),
                       f'<div class="text">“{html.escape(example.text)}”</div>']
            figures += [_image_tag(split.image_paths[i], f"#{rank + 1}" + (" correct" if hit else ""),
                                   "hit" if hit else "")
                        for rank, (i, hit) in enumerate(zip(example.ranked, example.hits))]
            parts.append('<div class="query">' + "".join(figures) + "</div>")
    parts.append("</body></html>")
    atomic_write_text(out, "\n".join(parts))

"""benchmarks/render_results.py: the results page and the README's summary, generated from results JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

import render_results  # noqa: E402
from render_results import RenderError, generated_pages, load_results, parse_tables, render  # noqa: E402

README = f"# x\n\nabove\n{render_results.SUMMARY_BEGIN}\nstale\n{render_results.SUMMARY_END}\nbelow\n"


def test_pages_from_the_fixture_have_the_hand_computed_numbers(tmp_path: Path) -> None:
    pages = generated_pages(load_results(FIXTURE / "records"), README, FIXTURE / "pages", tmp_path)
    page = pages[tmp_path / "docs" / "results.md"]
    assert "| tirg | 25.5 ± 1.5 | 61.0 ± 2.0 | 300 |" in page           # the table as the benchmark printed it
    assert "*(Recorded 2026-12-01 at commit 0123456789.)*" in page
    assert ("*(Published in the README at commit 9626bf4ffe on 2026-11-23, as the benchmark printed it; the run's "
            "own commit and raw numbers were not kept. Known issue: the spread is understated.)*") in page
    assert "TIRG leads image-only by 15.5 points on cirr," in page      # 25.5 - 10.0
    assert "spread 1.1; mean over both datasets 22.75;" in page          # (25.5 + 20.0) / 2
    assert '"add" pointing game 8; seconds 1,200.' in page
    assert "Four clients: 23.5 requests/s, 4.05x the latency." in page  # 168.6 / 41.6
    assert "{{" not in page
    readme = pages[tmp_path / "README.md"]
    assert readme == (f"# x\n\nabove\n{render_results.SUMMARY_BEGIN}\n| dataset | TIRG R@1 |\n|---|---|\n"
                      f"| cirr | 25.5 ± 1.5 |\n| css3d | 20.0 ± 1.0 |\n{render_results.SUMMARY_END}\nbelow\n")


def test_rows_are_picked_by_cells_and_headings() -> None:
    rows = parse_tables(json.loads((FIXTURE / "records" / "quality.json").read_text())["markdown"])
    assert [(row.heading.split()[0], row.cells.get("model", row.cells.get("map"))) for row in rows] == [
        ("cirr", "image_only"), ("cirr", "tirg"), ("css3d", "image_only"), ("css3d", "tirg"),
        ("css3d", "tirg"), ("css3d", "tirg")]
    assert rows[0].text_columns == ("model",)
    assert rows[4].text_columns == ("map", "edit")


@pytest.mark.parametrize(("placeholder", "message"), [
    ("{{quality: tirg -> R@1}}", "2 rows of quality match ['tirg']"),           # cirr and css3d
    ("{{quality: cirr; tirg -> R@5}}", "no column 'R@5'"),
    ("{{quality: cirr; concat -> R@1}}", "0 rows of quality match"),
    ("{{nothing: tirg -> R@1}}", "no results file benchmarks/results/nothing.json"),
    ("{{quality: cirr; tirg R@1}}", "write NAME: cell; cell -> column"),
    ("{{quality: cirr; tirg -> model}}", "holds no number"),
    ("{{quality: cirr; tirg -> train s/run ±}}", "has no ± spread"),
    ("{{[quality: cirr; tirg -> R@1].real}}", "only numbers, [references]"),
    ("{{[quality: cirr; tirg -> R@1] + __import__('os').getpid()}}", "only numbers, [references]"),
    ("{{table missing}}", "no results file benchmarks/results/missing.json"),
])
def test_a_bad_placeholder_names_what_is_wrong(placeholder: str, message: str) -> None:
    with pytest.raises(RenderError) as raised:
        render(f"text {placeholder} text", load_results(FIXTURE / "records"), "page.md")
    assert message in str(raised.value)
    assert str(raised.value).startswith("page.md: ")


def test_a_results_file_without_its_provenance_is_refused(tmp_path: Path) -> None:
    record = json.loads((FIXTURE / "records" / "quality.json").read_text())
    del record["commit"]
    (tmp_path / "bad.json").write_text(json.dumps(record))
    with pytest.raises(RenderError, match="bad.json: missing commit"):
        load_results(tmp_path)


def test_the_committed_pages_are_what_the_renderer_writes() -> None:
    """docs/results.md and the README's summary are generated, so regenerating them changes nothing."""
    run = subprocess.run([sys.executable, "benchmarks/render_results.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr

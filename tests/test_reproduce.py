"""The reproduction pipeline in-process at tiny size: table, figure and JSON written."""

from __future__ import annotations

import json

import pytest

from freetf.sweeps.reproduce import main, markdown_table

pytestmark = pytest.mark.timeout(300)


def test_in_process_pipeline_writes_table_and_figure(tmp_path):
    code = main(["--in-process", "--config", "configs/tiny.yaml", "--kappas", "0.015625", "8",
                 "--groups", "1", "--per-group", "3", "--out", str(tmp_path), "--name", "r",
                 "--set", "training.max_steps=3", "--set", f"checkpoint.dir={tmp_path}/ck"])
    assert code == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["kappa_bits"] for r in rows] == pytest.approx([0.015625, 8.0])
    for row in rows:
        assert {"kl_bits", "ce_gap", "shared/valid_rate", "independent/noise_overlap"} <= set(row)
    text = (tmp_path / "r.md").read_text()
    assert "| κ (bits) |" in text and "![figure](r.png)" in text and "shared Z" in text
    assert (tmp_path / "r.png").stat().st_size > 10_000


def test_markdown_table_marks_missing_values():
    table = markdown_table([{"kappa_bits": 1.0, "seed": 0, "kl_bits": float("nan")}])
    assert table.splitlines()[2].startswith("| 1 | 0 | – |")

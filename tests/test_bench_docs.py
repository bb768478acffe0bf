"""The README's capacity estimates are the ones `make bench-scale`'s stored results give.

An administrator sizes a chain's plan from the README's *Expected* table: it must follow from the
per-unit figures of the last `make bench-scale` (`bench/results/scale.json`) by the model
`bench/capacity.py` states, not be edited by hand after the figures changed."""

from __future__ import annotations

import json
from pathlib import Path

from bench.capacity import RUNS_PER_MONTH, markdown

ROOT = Path(__file__).resolve().parents[1]


def _expected_table() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Capacity", 1)[1].split("\n## ", 1)[0]
    start = section.index("| businesses | appointments in the window |")
    end = section.index("\n\n", start)
    return section[start:end]


def test_the_readmes_capacity_table_is_computed_from_the_stored_scale_results():
    scale = json.loads((ROOT / "bench" / "results" / "scale.json").read_text())
    table = markdown(scale).split("\n\n")[0]
    assert _expected_table() == table, "run `python -m bench.capacity` and paste its table into README's Capacity"


def test_the_readme_states_the_date_and_commit_of_the_scale_results_it_uses():
    scale = json.loads((ROOT / "bench" / "results" / "scale.json").read_text())
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Capacity", 1)[1].split("\n## ", 1)[0]
    assert scale["generated_at"][:10] in section
    assert scale["machine"]["commit"].removesuffix("+changes") in section
    assert f"{RUNS_PER_MONTH:,} runs a month" in section

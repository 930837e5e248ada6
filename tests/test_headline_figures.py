"""The README's results table quotes the committed result files: each row's figure and
budget are read here from the file its linked section names, so a rerun that changes a
file, or an edit that changes a figure, cannot leave the two disagreeing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Row label -> (result file, entry of its "results" list or None for a reproduction file,
# test-time steps of the quoted figure, metric).
ROWS = {
    "Sine, K = 10, MAML": ("compare_sine.json", {"name": "maml", "shots": 10}, 10, "mse"),
    "Omniglot 5-way 1-shot, MAML": ("reproductions/maml_omniglot_5w1s.json", None, 10, "acc"),
    "Omniglot 5-way 1-shot, FOMAML": ("reproductions/fomaml_omniglot_5w1s.json", None, 10,
                                      "acc"),
    "Omniglot 5-way 1-shot, Reptile (Adam restarted per task)": (
        "compare_omniglot_5w1s.json", {"algorithm": "reptile"}, 50, "acc"),
    "Omniglot 5-way 5-shot, MAML": ("compare_omniglot_5w5s.json", {"algorithm": "maml"}, 10,
                                    "acc"),
    "Omniglot 5-way 5-shot, FOMAML": ("compare_omniglot_5w5s.json", {"algorithm": "fomaml"},
                                      10, "acc"),
    "Omniglot 5-way 5-shot, Reptile (Adam restarted per task)": (
        "compare_omniglot_5w5s.json", {"algorithm": "reptile"}, 50, "acc"),
    "Omniglot 5-way 1-shot, MAML++": ("compare_omniglot_5w1s_variants.json",
                                      {"algorithm": "mamlpp"}, 10, "acc"),
    "Omniglot 5-way 1-shot, iMAML": ("compare_omniglot_5w1s_imaml.json",
                                     {"algorithm": "imaml"}, 20, "acc"),
}


def _readme_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"\| \[([^\]]+)\]\([^)]+\) \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def _quoted(spec) -> tuple[str, int]:
    """The figure ``mean ± ci`` the row should quote, and the run's iterations."""
    name, entry, steps, metric = spec
    data = json.loads((RESULTS / name).read_text())
    if entry is None:  # a full reproduction: its test evaluation and settings
        result, iterations = data["test"]["transductive"], data["run"]["settings"]["iterations"]
    else:
        (result,) = [r for r in data["results"] if entry.items() <= r.items()]
        iterations = result["iterations"]
        result = result if metric == "mse" else result["transductive"]
    assert result["steps"][steps] == steps
    if metric == "mse":
        return f"{result['mse'][steps]:.3f} ± {result['ci95'][steps]:.3f}", iterations
    return (f"{100 * result['accuracy'][steps]:.2f} ± {100 * result['ci95'][steps]:.2f}",
            iterations)


def test_every_numeric_row_is_checked():
    numeric = {label for label, cells in _readme_rows().items() if "±" in cells[1]}
    assert numeric, "the README's results table was not found"
    assert numeric <= ROWS.keys(), f"rows with no result file to check: {numeric - ROWS.keys()}"


@pytest.mark.parametrize("label", sorted(ROWS))
def test_row_quotes_its_result_file(label):
    rows = _readme_rows()
    assert label in rows, f"the README's results table has no row {label!r}"
    budget, ours = rows[label][0], rows[label][1]
    figure, iterations = _quoted(ROWS[label])
    assert figure in ours.replace("*", ""), (
        f"{label}: README says {ours}, {ROWS[label][0]} says {figure}")
    assert budget.replace("*", "").startswith(f"{iterations:,} /"), (
        f"{label}: README's budget {budget}, the file's run {iterations:,} iterations")

"""The results tables of the README and of the Reproductions page quote the committed
result files: each row's figure and budget are read here from the file its linked section
names, so a rerun that changes a file, or an edit that changes a figure, cannot leave the
two disagreeing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Row label -> (result file, entry of its "results" list, or for a reproduction file None
# (transductive) or "non_transductive", test-time steps of the quoted figure, metric).
ROWS = {
    "Sine, K = 10, MAML": ("compare_sine.json", {"name": "maml", "shots": 10}, 10, "mse"),
    "Omniglot 5-way 1-shot, MAML": ("reproductions/maml_omniglot_5w1s.json", None, 10, "acc"),
    "Omniglot 5-way 1-shot, FOMAML": ("reproductions/fomaml_omniglot_5w1s.json", None, 10,
                                      "acc"),
    "Omniglot 5-way 1-shot, Reptile": ("reproductions/reptile_omniglot_5w1s.json", None, 50,
                                       "acc"),
    "Omniglot 5-way 1-shot, Reptile, non-transductive": (
        "reproductions/reptile_omniglot_5w1s.json", "non_transductive", 50, "acc"),
    "Omniglot 5-way 5-shot, MAML": ("compare_omniglot_5w5s.json", {"algorithm": "maml"}, 10,
                                    "acc"),
    "Omniglot 5-way 5-shot, FOMAML": ("compare_omniglot_5w5s.json", {"algorithm": "fomaml"},
                                      10, "acc"),
    "Omniglot 5-way 5-shot, Reptile (Adam restarted per task)": (
        "compare_omniglot_5w5s.json", {"algorithm": "reptile"}, 50, "acc"),
    "Omniglot 5-way 1-shot, MAML++": ("reproductions/mamlpp_omniglot_5w1s.json", None, 5,
                                      "acc"),
    "Omniglot 5-way 1-shot, iMAML": ("reproductions/imaml_omniglot_5w1s.json", None, 16,
                                     "acc"),
    # A paired difference across seeds, from the study's summary.
    "Reptile §6.2, overlapping mini-batches": (
        "reproductions/reptile_overlap.json",
        "fomaml-shared-cycle-k8-b25 minus fomaml-separate-cycle-k8-b25", None, "paired"),
}


# The Reproductions page's summary table names its rows more briefly.
PAGE_LABELS = {"Sine, K = 10, MAML, MSE after 10 steps": "Sine, K = 10, MAML"}
PAGES = ["README.md", "docs/reproductions.md"]


def _rows(page: str) -> dict[str, list[str]]:
    """The results table's rows of ``page`` by the README's label: budget, ours, paper."""
    rows = {}
    for line in (ROOT / page).read_text().splitlines():
        match = re.match(r"\| \[([^\]]+)\]\([^)]+\) \|(.*)\|$", line)
        if match:
            label = PAGE_LABELS.get(match.group(1), match.group(1))
            label = re.sub(r"Omniglot (\d+)w(\d+)s", r"Omniglot \1-way \2-shot", label)
            rows[label] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def _quoted(spec) -> tuple[str, int]:
    """The figure ``mean ± ci`` the row should quote, and the run's iterations."""
    name, entry, steps, metric = spec
    data = json.loads((RESULTS / name).read_text())
    if metric == "paired":
        assert data["header"]["complete"], f"{name}: the study has not finished"
        diff = data["summary"]["paired_differences"][entry]
        # The pages write a negative difference with a minus sign, as their tables do.
        return (f"{100 * diff['mean']:.2f} ± {100 * diff['ci95']:.2f}".replace("-", "\u2212"),
                data["header"]["iterations"])
    if entry is None or isinstance(entry, str):  # a full reproduction: test and settings
        result = data["test"][entry or "transductive"]
        # The iterations trained: a wall-clock budget can end a run before its schedule.
        iterations = data.get("iterations", data["run"]["settings"]["iterations"])
    else:
        (result,) = [r for r in data["results"] if entry.items() <= r.items()]
        iterations = result["iterations"]
        result = result if metric == "mse" else result["transductive"]
    assert result["steps"][steps] == steps
    if metric == "mse":
        return f"{result['mse'][steps]:.3f} ± {result['ci95'][steps]:.3f}", iterations
    return (f"{100 * result['accuracy'][steps]:.2f} ± {100 * result['ci95'][steps]:.2f}",
            iterations)


@pytest.mark.parametrize("page", PAGES)
def test_every_numeric_row_is_checked(page):
    numeric = {label for label, cells in _rows(page).items() if "±" in cells[1]}
    assert numeric, f"{page}: the results table was not found"
    assert numeric <= ROWS.keys(), f"{page}: rows with no file to check: {numeric - ROWS.keys()}"


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("label", sorted(ROWS))
def test_row_quotes_its_result_file(page, label):
    rows = _rows(page)
    assert label in rows, f"{page}: the results table has no row {label!r}"
    budget, ours = rows[label][0], rows[label][1]
    figure, iterations = _quoted(ROWS[label])
    assert figure in ours.replace("*", ""), (
        f"{page}, {label}: the page says {ours}, {ROWS[label][0]} says {figure}")
    assert re.match(rf"{iterations:,}\b(?!,)", budget.replace("*", "")), (
        f"{page}, {label}: the page's budget {budget}, the file's run {iterations:,} iterations")

"""benchmarks/ is an indexed set: every script is listed in its README, and every result
file the docs cite is committed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def test_every_benchmark_script_is_in_the_index():
    index = (BENCHMARKS / "README.md").read_text()
    scripts = [p for p in BENCHMARKS.rglob("*.py") if p.name != "__init__.py"
               and not any(part.startswith(".") for part in p.relative_to(BENCHMARKS).parts)]
    scripts += list((BENCHMARKS / "peers").glob("*.sh"))
    assert len(scripts) > 20  # the walk found the scripts
    missing = sorted(str(p.relative_to(BENCHMARKS)) for p in scripts if p.name not in index)
    assert not missing, f"scripts missing from benchmarks/README.md: {missing}"


def test_every_result_file_the_docs_cite_exists():
    pages = [ROOT / "README.md", BENCHMARKS / "README.md", *(ROOT / "docs").rglob("*.md")]
    cited: dict[str, str] = {}
    for page in pages:
        for name in re.findall(r"benchmarks/results/([\w./-]+\.(?:jsonl|json|md|png|pt))\b",
                               page.read_text()):
            cited.setdefault(name, str(page.relative_to(ROOT)))
    assert len(cited) > 20  # the pattern found the citations
    missing = {name: page for name, page in cited.items()
               if not (BENCHMARKS / "results" / name).exists()}
    assert not missing, f"result files cited in the docs but not committed: {missing}"

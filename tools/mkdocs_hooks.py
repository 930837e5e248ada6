"""MkDocs hook: the committed benchmark plots become site files under ``assets/``.

The plots live in ``benchmarks/results/`` beside the JSON they are drawn from; the pages
link them as ``assets/<name>.png``. Adding them at build time keeps one copy in git, and a
page that links a plot which does not exist fails ``mkdocs build --strict``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def on_files(files: Files, config, **kwargs) -> Files:
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"assets/{png.name}", abs_src_path=str(png)))
    return files

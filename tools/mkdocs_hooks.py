"""MkDocs hook: the committed benchmark plots become site files under ``assets/``.

The plots live in ``benchmarks/results/`` beside the JSON they are drawn from, and the pages
link them there (``../benchmarks/results/<name>.png`` from a top-level page), so that they
also show where a page is read as a file of the repository. At build time each plot is
added to the site as ``assets/<path under results>``, and each page's links to it are
rewritten to that copy: one copy in git, and a page that links a plot which does not exist
fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"

# A markdown image or link target ending in .png: ](target) with no title.
_PNG_TARGET = re.compile(r"\]\(([^)\s]+\.png)\)")


def asset_path(plot: Path) -> str:
    """The site path of a plot under ``benchmarks/results``."""
    return "assets/" + plot.relative_to(RESULTS).as_posix()


def rewrite_plot_links(markdown: str, page_src_uri: str) -> str:
    """``markdown`` of the page at ``page_src_uri`` (relative to ``docs/``) with its links to
    plots under ``benchmarks/results`` pointed at their site copies. Other links stay."""
    page_dir = (DOCS / page_src_uri).parent

    def site_link(match: re.Match) -> str:
        target = (page_dir / match.group(1)).resolve()
        if not target.is_relative_to(RESULTS):
            return match.group(0)
        link = posixpath.relpath(asset_path(target), posixpath.dirname(page_src_uri) or ".")
        return f"]({link})"

    return _PNG_TARGET.sub(site_link, markdown)


def on_files(files, config, **kwargs):
    # Imported here so that the link rewriting imports without MkDocs (the tests use it).
    from mkdocs.structure.files import File

    for png in sorted(RESULTS.rglob("*.png")):
        files.append(File.generated(config, asset_path(png), abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    return rewrite_plot_links(markdown, page.file.src_uri)

"""The code in the README and the docs runs (so the docs cannot rot).

Every fenced ``python`` or ``bash`` block of the pages below runs, top to bottom, each group
of pages in a fresh working folder and a fresh namespace (a tutorial is a group of its own;
the algorithm pages, whose examples are a few lines each, share one). The ``python`` blocks
of a group share that namespace, so a later block may use what an earlier one defined, and
each command of a ``bash`` block must exit with 0: a ``metalearn ...`` line runs in-process
through ``metalearn.cli.main``, any other line in the shell. All groups run in one child
interpreter, which imports torch once (most of the cost of a short page). A block is
skipped only when the line just above its opening fence is ``<!-- docs-test: skip -->``
(installs, downloads, runs of hours); blocks of any other language (``text``, ``console``,
...) are not run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _pages(folder: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob("*.md"))


GROUPS = {
    "README.md": ["README.md"],
    "getting-started": ["docs/getting-started.md"],
    "datasets": ["docs/datasets.md"],
    **{Path(page).stem: [page] for page in _pages("docs/tutorials")},
    "algorithms and performance": [*_pages("docs/algorithms"), "docs/performance.md"],
}
SKIP = "<!-- docs-test: skip -->"
RUNNABLE = {"python": "python", "py": "python", "bash": "shell", "sh": "shell"}
FENCE = re.compile(r"^(`{3,})\s*([\w-]*)")

# The child interpreter: reads {group: [block, ...]} on stdin, runs each group in a fresh
# folder and namespace, and ends with one line "FAILURES {group: traceback}".
RUNNER = r'''
import json, os, shlex, subprocess, sys, tempfile, traceback

groups = json.load(sys.stdin)
top = os.getcwd()


def commands(text):
    # The block's commands: continuation lines joined, comments and blank lines dropped.
    line = ""
    for raw in text.splitlines():
        line += raw
        if line.endswith("\\"):
            line = line[:-1] + " "
            continue
        if shlex.split(line, comments=True):
            yield line
        line = ""


def run(blocks):
    namespace = {"__name__": "__main__"}
    for block in blocks:
        print(f"=== {block['where']}", flush=True)
        if block["kind"] == "python":
            exec(compile(block["code"], block["where"], "exec"), namespace)
            continue
        for command in commands(block["code"]):
            print(f"$ {command}", flush=True)
            argv = shlex.split(command, comments=True)
            if argv[0] == "metalearn":
                from metalearn.cli import main

                code = main(argv[1:])
            else:
                code = subprocess.run(command, shell=True).returncode
            if code:
                raise RuntimeError(f"{block['where']}: `{command}` exited with {code}")


failures = {}
for name, blocks in groups.items():
    os.chdir(tempfile.mkdtemp(dir=top))
    try:
        run(blocks)
    except BaseException:  # SystemExit from argparse too
        failures[name] = traceback.format_exc()
        print(failures[name], flush=True)
print("FAILURES " + json.dumps(failures), flush=True)
'''


def code_blocks(page: str) -> list[dict]:
    """The page's runnable blocks: kind, code, and where it starts (page:line)."""
    lines = (ROOT / page).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, lang = opening.group(1), opening.group(2).lower()
        start = i + 1
        i = start
        while i < len(lines) and not lines[i].startswith(fence):
            i += 1
        skipped = start >= 2 and lines[start - 2].strip() == SKIP
        if lang in RUNNABLE and not skipped:
            blocks.append({"kind": RUNNABLE[lang], "code": "\n".join(lines[start:i]) + "\n",
                           "where": f"{page}:{start}"})
        i += 1
    return blocks




def test_blocks_are_found():
    """Every group has runnable code, and the tutorials are all there."""
    for name, pages in GROUPS.items():
        assert any(code_blocks(page) for page in pages), f"{name} has no runnable code block"
    assert len(GROUPS) >= 9


@pytest.fixture(scope="module")
def docs_run(tmp_path_factory):
    """Every group's blocks, run in one child interpreter: its output, failures by group."""
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           # torchrun and other console scripts of this interpreter's environment
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    blocks = {name: [block for page in pages for block in code_blocks(page)]
              for name, pages in GROUPS.items()}
    result = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(blocks),
                            capture_output=True, text=True, env=env, timeout=900,
                            cwd=tmp_path_factory.mktemp("docs"))
    lines = result.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("FAILURES "), (
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout, json.loads(lines[-1][len("FAILURES "):])


@pytest.mark.parametrize("group", GROUPS)
def test_code_runs(group, docs_run):
    output, failures = docs_run
    assert group not in failures, f"{group}:\n{failures[group]}"


def _anchors(page: Path) -> set[str]:
    """The heading anchors of a Markdown page, as GitHub and MkDocs both spell them."""
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def test_readme_links_resolve():
    """The README's links into the repository name files (and headings) that exist."""
    links = re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert len(local) >= 10
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links {link}, which does not exist"
        if anchor:
            assert anchor in _anchors(target), f"README links {link}: no such heading"


def test_docs_plots_show_in_the_repository_and_the_site():
    """Each page links its plots where they are committed (so a page read as a repository
    file shows them), and the build hook points those links at the site's copies."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import mkdocs_hooks
    finally:
        sys.path.remove(str(ROOT / "tools"))
    docs = ROOT / "docs"
    found = 0
    for page in sorted(docs.rglob("*.md")):
        src_uri = page.relative_to(docs).as_posix()
        markdown = page.read_text()
        for link in re.findall(r"\]\(([^)\s]+\.png)\)", markdown):
            found += 1
            plot = (page.parent / link).resolve()
            assert plot.is_file() and plot.is_relative_to(mkdocs_hooks.RESULTS), (
                f"{src_uri} links {link}, which is not a plot under benchmarks/results")
            rewritten = mkdocs_hooks.rewrite_plot_links(f"![p]({link})", src_uri)
            target = re.fullmatch(r"!\[p\]\((.+)\)", rewritten).group(1)
            site_copy = docs / mkdocs_hooks.asset_path(plot)
            assert (page.parent / target).resolve() == site_copy.resolve()
    assert found >= 10
    # A link that is not a plot under benchmarks/results is left as it is.
    assert mkdocs_hooks.rewrite_plot_links("![x](img/a.png)", "index.md") == "![x](img/a.png)"

"""The API reference covers the public API, and every public class documents itself.

The docs site renders docstrings with mkdocstrings (``::: name`` directives in ``docs/``);
these tests find the public names that no directive renders, and the public classes whose
docstring lacks a description of its arguments or an example.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Packages whose public names are their __all__.
PACKAGES = ["metalearn", "metalearn.data", "metalearn.models", "metalearn.algorithms",
            "metalearn.kernels", "metalearn.export"]
# Modules whose public names are the classes and functions they define without a leading _.
MODULES = ["metalearn.evaluation", "metalearn.training", "metalearn.config",
           "metalearn.search", "metalearn.memory", "metalearn.allocator",
           "metalearn.checkpoint", "metalearn.user_objects", "metalearn.plot_run"]


def _defined_in(module) -> dict[str, object]:
    return {name: obj for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
            and obj.__module__ == module.__name__}


def public_api() -> dict[str, object]:
    names: dict[str, object] = {}
    for package in PACKAGES:
        module = importlib.import_module(package)
        names.update({f"{package}.{n}": getattr(module, n) for n in module.__all__})
    for name in MODULES:
        module = importlib.import_module(name)
        names.update({f"{name}.{n}": obj for n, obj in _defined_in(module).items()})
    return names


def _directives() -> list[tuple[str, list[str] | None]]:
    """Each ``::: target`` of the docs, with its ``members:`` list (None: all public)."""
    found = []
    for page in (ROOT / "docs").rglob("*.md"):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            match = re.match(r"^::: ([\w.]+)\s*$", line)
            if not match:
                continue
            block = []
            for follow in lines[i + 1:]:
                if follow.strip() and not follow.startswith("    "):
                    break
                block.append(follow)
            text = "\n".join(block)
            members: list[str] | None = None
            inline = re.search(r"members:\s*\[([^\]]*)\]", text, re.S)
            listed = re.search(r"members:\s*\n((?:\s+- \w+\n?)+)", text)
            if inline:
                members = [m.strip() for m in inline.group(1).split(",") if m.strip()]
            elif listed:
                members = re.findall(r"- (\w+)", listed.group(1))
            elif re.search(r"members:\s*false", text):
                members = []
            found.append((match.group(1), members))
    return found


def _resolve(target: str):
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(target)


def rendered_objects() -> set[int]:
    ids: set[int] = set()
    for target, members in _directives():
        obj = _resolve(target)
        ids.add(id(obj))
        if inspect.ismodule(obj):
            inner = (_defined_in(obj) if members is None
                     else {m: getattr(obj, m) for m in members})
            if members is None and hasattr(obj, "__all__"):
                inner.update({n: getattr(obj, n) for n in obj.__all__})
            ids.update(id(o) for o in inner.values())
    return ids


def test_the_directive_parser_sees_the_reference_pages():
    targets = dict(_directives())
    assert targets["metalearn.data"] is not None and "FewShotTasks" in targets["metalearn.data"]
    assert targets["metalearn.kernels"] == []
    assert targets["metalearn.config"] is None


def test_every_public_name_is_in_the_api_reference():
    rendered = rendered_objects()
    missing = sorted(name for name, obj in public_api().items() if id(obj) not in rendered)
    assert not missing, f"public names no ::: directive in docs/ renders: {missing}"


def _classes() -> list[tuple[str, type]]:
    seen: dict[int, tuple[str, type]] = {}
    for name, obj in public_api().items():
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            seen.setdefault(id(obj), (name, obj))
    return sorted(seen.values())


@pytest.mark.parametrize("name,cls", _classes(), ids=[n for n, _ in _classes()])
def test_public_classes_describe_their_arguments_and_show_an_example(name, cls):
    doc = inspect.getdoc(cls) or ""
    assert doc, f"{name} has no docstring"
    assert "Example" in doc and ">>>" in doc, f"{name}'s docstring has no doctested example"
    takes_arguments = [p for p in inspect.signature(cls).parameters.values()
                       if p.kind not in (p.VAR_POSITIONAL,)]
    if takes_arguments:
        assert re.search(r"^(Args|Attributes):", doc, re.M), (
            f"{name} takes arguments but its docstring has no Args or Attributes section")


def test_public_functions_have_docstrings():
    bare = sorted(name for name, obj in public_api().items()
                  if inspect.isfunction(obj) and not inspect.getdoc(obj))
    assert not bare, f"public functions without a docstring: {bare}"


@pytest.mark.parametrize("module,cls", [("metalearn.config", "TrainConfig"),
                                        ("metalearn.training", "TrainResult"),
                                        ("metalearn.search", "SearchResult")])
def test_dataclass_attributes_are_each_described(module, cls):
    klass = getattr(importlib.import_module(module), cls)
    doc = inspect.getdoc(klass)
    section = doc.split("Attributes:", 1)[1].split("\n\n")[0]
    described = set(re.findall(r"^    (\w+):", section, re.M))
    undocumented = [f.name for f in dataclasses.fields(klass) if f.name not in described]
    assert not undocumented, f"{cls} fields missing from its Attributes section: {undocumented}"

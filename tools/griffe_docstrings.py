"""Griffe extension for the docs: the docstrings as written here, rendered well.

Loaded by ``mkdocs.yml`` (``extensions: [tools/griffe_docstrings.py]``). Before griffe
parses a docstring it rewrites three things, none of them in the library's source:

- **Sphinx roles** (``:class:`~metalearn.MAML```, ``:meth:`step```), which Markdown would
  show literally, become optional cross-references: a link where the target is documented
  on the site, plain code where it is not (a private helper, say), never a build warning.
  ``~`` shows only the last name, as in Sphinx.
- **``Example:``** (singular), which griffe's Google parser reads as an admonition, so that
  the doctest would render as quoted text, becomes ``Examples:``, rendered as code.
- **An argument entry for several parameters** (``inner_flood, flood_mode: as for
  MAML.``) becomes one entry per parameter, so that griffe matches each to the signature
  and still warns about a documented parameter that does not exist. Parameters a class
  only passes on through ``**kwargs`` move to a ``Keyword Args:`` section.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
ARGS = re.compile(r"^(\s*)(?:Args|Arguments|Parameters):\s*$")
NAMES_ONLY = re.compile(r"^\s*\w+(?:\s*,\s*\w+)*\s*,\s*$")
GROUPED = re.compile(r"^(\s+)(\w+(?:\s*,\s*\w+)+)\s*:(.*)$")
ROLE = re.compile(r":(?:class|meth|func|mod|attr|data|exc|obj):`(~?)([\w.]+)`")


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The full path ``name`` means in ``obj``'s docstring, if it can be found."""
    if name.startswith("metalearn"):
        return name
    head = name.split(".")[0]
    scope: griffe.Object | None = obj
    while scope is not None:
        if head in scope.members:
            return f"{scope.path}.{name}"
        scope = scope.parent
    return None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_arguments(text: str, forwarded: frozenset[str] = frozenset()) -> str:
    """``a, b: text`` entries of an ``Args:`` section as ``a: text`` and ``b: text``.

    Entries for the names in ``forwarded`` (passed on through ``**kwargs``, so absent from
    the signature) move to a ``Keyword Args:`` section after the arguments.
    """
    lines, out, i, section = text.split("\n"), [], 0, None
    keyword: list[str] = []

    def close_section() -> None:
        if keyword:
            out.append(" " * section + "Keyword Args:")
            out.extend(keyword)
            keyword.clear()

    while i < len(lines):
        line = lines[i]
        header = ARGS.match(line)
        if header:
            section = len(header.group(1))
            out.append(line)
            i += 1
            continue
        if section is not None and line.strip() and _indent(line) <= section:
            close_section()
            section = None
        if section is not None:
            entry, j = line, i
            while NAMES_ONLY.match(entry) and j + 1 < len(lines):  # names wrapped over lines
                j += 1
                entry = entry.rstrip() + " " + lines[j].strip()
            grouped = GROUPED.match(entry)
            if grouped:
                indent, names, description = grouped.groups()
                k, more = j + 1, []
                while k < len(lines) and lines[k].strip() and _indent(lines[k]) > len(indent):
                    more.append(lines[k])
                    k += 1
                for name in (n.strip() for n in names.split(",")):
                    target = keyword if name in forwarded else out
                    target.append(f"{indent}{name}:{description}")
                    target.extend(more)
                i = k
                continue
        out.append(line)
        i += 1
    if section is not None:
        close_section()
    return "\n".join(out)


def _forwarded(obj: griffe.Object) -> frozenset[str]:
    """Names a docstring may document that ``obj``'s signature takes only via ``**kwargs``:
    the parameters of the same name in its parent classes' ``__init__``."""
    function = obj.members.get("__init__") if obj.is_class else obj
    if not isinstance(function, griffe.Function):
        return frozenset()
    if not any(p.kind is griffe.ParameterKind.var_keyword for p in function.parameters):
        return frozenset()
    own = {p.name for p in function.parameters}
    inherited: set[str] = set()
    for base in obj.mro() if obj.is_class else ():
        init = base.members.get("__init__")
        if isinstance(init, griffe.Function):
            inherited |= {p.name for p in init.parameters}
    return frozenset(inherited - own)


def rewrite(obj: griffe.Object, text: str) -> str:
    """``text`` with Sphinx roles as optional autorefs (or code) and ``Examples:``."""

    def replace(match: re.Match[str]) -> str:
        short, name = match.group(1), match.group(2)
        shown = name.rsplit(".", 1)[-1] if short else name
        code = f"<code>{html.escape(shown)}</code>"
        target = _resolve(obj, name)
        if target is None:
            return code
        return f'<autoref identifier="{html.escape(target)}" optional>{code}</autoref>'

    text = split_grouped_arguments(ROLE.sub(replace, text), _forwarded(obj))
    return EXAMPLE.sub(r"\1Examples:", text)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every loaded object's docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and not obj.is_alias:
            obj.docstring.value = rewrite(obj, obj.docstring.value)

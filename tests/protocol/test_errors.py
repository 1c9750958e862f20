"""protocol/errors.py: the diagram in the module docstring is the tree the code defines."""

from __future__ import annotations

import inspect
import re

import pytest
from edgefleet.protocol import errors

TREE_LINE = re.compile(r"^(?P<indent>[ │]*(?:[├└]── )?)(?P<name>[A-Z]\w*Error)\b")


def diagram(doc: str) -> dict[str, str | None]:
    """Each class named in the tree, mapped to the class it hangs under (None for the root)."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, name) along the current branch
    for line in doc.splitlines():
        m = TREE_LINE.match(line[4:]) if line.startswith("    ") else None
        if m is None:
            continue
        col, name = len(m.group("indent")), m.group("name")
        while stack and stack[-1][0] >= col:
            stack.pop()
        assert name not in parents, f"{name} appears twice in the diagram"
        parents[name] = stack[-1][1] if stack else None
        stack.append((col, name))
    return parents


def defined() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if cls.__module__ == errors.__name__:
            (base,) = cls.__bases__
            out[name] = None if base is Exception else base.__name__
    return out


def test_the_diagram_names_every_class_under_its_real_base() -> None:
    assert errors.__doc__ is not None
    assert diagram(errors.__doc__) == defined()


def test_every_class_is_exported() -> None:
    assert sorted(errors.__all__) == sorted(defined())


@pytest.mark.parametrize(("doc", "expected"), [
    ("    AError\n    ├── BError\n    │   └── CError\n    └── DError\n",
     {"AError": None, "BError": "AError", "CError": "BError", "DError": "AError"}),
    ("    AError\n    └── BError\n        └── CError\n",
     {"AError": None, "BError": "AError", "CError": "BError"}),
])
def test_the_parser_reads_depth_from_the_column(doc: str, expected: dict[str, str | None]) -> None:
    """The parser itself can tell a child from a sibling (else the test above proves nothing)."""
    assert diagram(doc) == expected


@pytest.mark.parametrize(("cls", "root"), [
    (errors.CorruptStateError, errors.StoreError),
    (errors.KeyExpiredError, errors.ConfigError),
])
def test_operator_and_disk_errors_are_not_the_senders_fault(
    cls: type[errors.EdgeFleetError], root: type[errors.EdgeFleetError]
) -> None:
    assert issubclass(cls, root) and issubclass(cls, errors.EdgeFleetError)
    assert not issubclass(cls, errors.BundleError)


def test_codes_are_distinct() -> None:
    """The code is what the coordinator is told; two classes must not share one."""
    codes = [getattr(errors, name).code for name in errors.__all__]
    assert len(set(codes)) == len(codes)

"""The ingress rules document (server/syncplane/ingress/README.md, issue 12: "the rules table,
with a test per row") says what the code does: every row of the rules table names at least one
test, and every test it names exists; every cell of its conversion table converts, or is a
start-time problem, exactly as `ingress.conversion.converter` decides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from syncplane.ingress.conversion import DESTINATION_TYPES, NotConvertible, SourceType, converter

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "server" / "syncplane" / "ingress" / "README.md"


def table(title: str) -> list[list[str]]:
    """The cells of the first Markdown table after the line that starts with ``title``."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert len(rows) > 2, f"no table after {title!r} in {DOC}"
    return rows[2:]   # without the header and its --- line


def module_path(name: str) -> Path:
    """A test module named as the document names it: a path under tests/, or a file name alone."""
    if "/" in name:
        return ROOT / name
    (found,) = ROOT.glob(f"tests/**/{name}")
    return found


def named_tests(cell: str) -> list[tuple[str, str]]:
    """(file, test function or "") for each `file.py[::name]` or `::name` (of the file named
    before it in the same cell) in a cell of the rules table."""
    out: list[tuple[str, str]] = []
    current = ""
    for ref in re.findall(r"`([^`]*(?:\.py|::)[^`]*)`", cell):
        file, _, name = ref.partition("::")
        current = file or current
        assert current, f"{ref!r} names a test before naming its file"
        out.append((current, name))
    return out


RULES = table("| rule |")


@pytest.mark.parametrize("row", RULES, ids=[r[0] for r in RULES])
def test_each_rule_names_tests_that_exist(row: list[str]) -> None:
    rule, _, tests = row
    refs = named_tests(tests)
    assert refs, f"the rule {rule} names no test"
    for file, name in refs:
        path = module_path(file)
        assert path.is_file(), f"{rule}: {file} does not exist"
        if name:
            assert re.search(rf"^(async )?def {re.escape(name)}\(", path.read_text(), re.M), \
                f"{rule}: {file} has no test {name}"


def sources(row_label: str) -> list[SourceType]:
    """The source types of one row of the conversion table: ``Lookup, Customer, Owner``, or a
    DateTime behaviour (``DateTime DateOnly``, ``DateTime UserLocal (either Format)``)."""
    if row_label.startswith("DateTime "):
        return [SourceType("DateTime", row_label.split()[1])]
    return [SourceType(t.strip()) for t in row_label.split(",")]


CONVERSIONS = table("| source ↓ / Campaign →")
HEADER = [c.strip() for c in next(line for line in DOC.read_text().splitlines()
                                  if line.startswith("| source ↓ / Campaign →")).strip("|").split("|")][1:]


def test_the_conversion_table_has_every_campaign_type() -> None:
    assert sorted(HEADER) == sorted(DESTINATION_TYPES)


@pytest.mark.parametrize("row", CONVERSIONS, ids=[r[0] for r in CONVERSIONS])
def test_each_documented_cell_is_what_the_code_does(row: list[str]) -> None:
    label, cells = row[0], row[1:]
    for source in sources(label):
        for destination, cell in zip(HEADER, cells, strict=True):
            documented = not cell.startswith("✗")   # "✗: why" is a start-time problem
            try:
                converter(source, destination)   # technicalPicklistValues on: a choice is its number
                converts = True
            except NotConvertible:
                converts = False
            assert converts == documented, f"{source.row} -> {destination}: the document says {cell!r}"

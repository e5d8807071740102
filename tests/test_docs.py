"""docs/operations.md stays true to the code: every row of its
troubleshooting table quotes (in backticks) words that the code still
prints. A message reworded in the code fails here until its row follows."""

from __future__ import annotations

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def section(path: str, title: str) -> str:
    with open(path) as f:
        text = f.read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def troubleshooting_rows() -> list[list[str]]:
    rows = []
    for line in section(os.path.join(ROOT, "docs", "operations.md"), "Troubleshooting").splitlines():
        if not line.startswith("| ") or line.startswith("| message ") or line.startswith("| ---"):
            continue
        # a | inside backticks is not a cell border
        cells = [c.strip() for c in re.split(r"\|(?=(?:[^`]*`[^`]*`)*[^`]*$)", line.strip().strip("|"))]
        rows.append(cells)
    return rows


def source_text() -> str:
    files = [f for f in glob.glob(os.path.join(ROOT, "migrate", "**", "*.py"), recursive=True)
             if os.sep + "proto" + os.sep not in f]
    files += glob.glob(os.path.join(ROOT, "native", "*.[ch]"))
    out = []
    for f in files:
        with open(f) as fh:
            out.append(fh.read())
    return "\n".join(out)


def not_printed(rows: list[list[str]], code: str) -> list[str]:
    """The quoted messages of rows that code does not contain."""
    missing = []
    for cells in rows:
        assert len(cells) == 4 and all(cells), f"a row needs message, from, meaning, what to do: {cells}"
        m = re.search(r"`([^`]+)`", cells[0])
        assert m, f"a row without a quoted message: {cells[0]}"
        if m.group(1) not in code:
            missing.append(m.group(1))
    return missing


def test_every_troubleshooting_row_quotes_a_message_the_code_prints():
    rows = troubleshooting_rows()
    assert len(rows) >= 60, f"the troubleshooting table has only {len(rows)} rows: was it cut?"
    missing = not_printed(rows, source_text())
    assert not missing, f"messages in docs/operations.md that the code no longer prints: {missing}"


def test_a_reworded_message_is_caught():
    rows = troubleshooting_rows()[:3]
    code = source_text()
    first = re.search(r"`([^`]+)`", rows[0][0]).group(1)
    assert not_printed(rows, code) == []
    assert not_printed(rows, code.replace(first, first.upper())) == [first]

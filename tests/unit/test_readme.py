"""The README's node table: every node the pack registers, one short line each, nothing else."""
from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_NAME = re.compile(r'schema\(cls, "(\w+)"|NAME, TITLE = "(\w+)"')
NODE_ROW = re.compile(r"^\| `(CSA_\w+)` \| [^|]+ \| ([^|]+) \| \[more\]\(#[a-z0-9-]+\) \|$")


def registered_ids() -> list[str]:
    """Published ids (CSA_<name>) of every schema in nodes/ (nodes/common.schema adds the prefix)."""
    return [f"CSA_{a or b}" for path in sorted((REPO_ROOT / "nodes").glob("*.py"))
            for a, b in SCHEMA_NAME.findall(path.read_text())]


def node_table() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("\n## Nodes\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def test_the_node_table_lists_every_registered_node_once_in_one_short_row():
    rows = node_table()
    ids = []
    for row in rows:
        match = NODE_ROW.match(row)
        assert match, f"not a one-node row: {row}"
        assert len(match.group(2)) <= 100, f"more than one line (details go in the decisions sections): {row}"
        ids.append(match.group(1))
    assert len(ids) == len(set(ids)), "a node listed twice"
    registered = registered_ids()
    assert len(registered) == 33, registered  # the pack's 33 nodes (nodes/__init__.py NODES)
    assert sorted(ids) == sorted(registered), f"missing {set(registered) - set(ids)}, extra {set(ids) - set(registered)}"


def test_every_details_link_names_a_heading():
    readme = (REPO_ROOT / "README.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
               for line in readme.splitlines() if line.startswith("#")}
    for row in node_table():
        anchor = re.search(r"\]\(#([a-z0-9-]+)\)", row).group(1)
        assert anchor in anchors, f"{row}: no heading #{anchor}"

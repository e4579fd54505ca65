"""The README and docs/ link to each other, to plots and to result files: every relative link must lead to a file
that exists, and every #anchor to a heading of that file (GitHub's heading ids), so moving a section breaks a test
rather than a reader's click."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_ids(markdown: str) -> set[str]:
    """GitHub's ids: lower case, punctuation dropped (letters, digits, spaces, '-' and '_' kept), spaces to '-';
    a repeated heading gets -1, -2, ..."""
    ids: set[str] = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        text = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in ids:
            n += 1
            candidate = f"{slug}-{n}"
        ids.add(candidate)
    return ids


def test_heading_ids_follow_github():
    ids = heading_ids("# Results: one 2 × H200 machine, the q / k kernel\n## Same\n## Same\n```\n# not a heading\n```")
    assert ids == {"results-one-2--h200-machine-the-q--k-kernel", "same", "same-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path) if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in heading_ids(file.read_text()):
            broken.append(f"{target}: no heading with that id in {file.name}")
    assert not broken, broken

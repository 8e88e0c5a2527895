"""The documentation holds together: every relative link in README.md and docs/*.md names a file that exists
(and, for `file.md#anchor` or `#anchor`, a heading that exists in it), and the README stays a newcomer's page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 330
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> list[str]:
    """The lines of a Markdown page outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces to hyphens, and
    -1, -2 ... on repeats."""
    found: set[str] = set()
    for line in _prose(page.read_text()):
        heading = re.match(r"#{1,6} (.+)", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def links(page: Path) -> list[str]:
    """The page's relative link targets (no scheme), outside code blocks and code spans."""
    return [target for line in _prose(page.read_text()) for target in LINK.findall(re.sub(r"`[^`]*`", "", line))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_the_pages_exist():
    names = {page.name for page in PAGES}
    assert {"README.md", "enqueue.md", "configuration.md", "operations.md", "internals.md", "figures.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_names_a_file_and_heading_that_exist(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(REPO) if file.is_relative_to(REPO) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {file.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_readme_stays_a_newcomers_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines, over {README_MAX_LINES}: move operator or developer detail to docs/")


def test_the_anchor_rule_matches_githubs():
    page = REPO / "docs" / "operations.md"
    assert {"status-counts-lag-and-throughput", "the-questions-at-3-am", "database-roles"} <= anchors(page)

"""The README and docs/ link to files that exist and to headings that exist (GitHub's anchors)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    headings, fenced = [], False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (match := re.match(r"#+ (.+)", line)):
            headings.append(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return set(headings)


def test_anchors_follow_github():
    assert anchors(REPO / "docs/embedded-task.md") >= {"the-previous-default-16-steps-of-64-configshort_opdyaml",
                                                       "on-a-second-machine-an-amd-epyc-with-avx-512"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(REPO)}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: broken links\n" + "\n".join(broken)


def test_the_readme_names_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert [p.name for p in PAGES[1:]] and all(f"docs/{p.name}" in readme for p in PAGES[1:])

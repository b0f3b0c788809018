"""The READMEs and docs/: every relative link names a file that exists, and every #anchor
a heading of the file it points into (GitHub's rule for heading anchors)."""

import re
from pathlib import Path

import pytest

from helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "experiments" / "results").glob("**/*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            slug = anchor(match.group(1))
            result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return result


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_the_anchor_rule():
    assert anchor("Semi-supervised MNIST: M1+M2") == "semi-supervised-mnist-m1m2"
    assert anchor("Statically binarized MNIST, the IWAE paper's budget") == \
        "statically-binarized-mnist-the-iwae-papers-budget"
    assert anchor("evaluate: what it writes") == "evaluate-what-it-writes"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(doc):
    broken = []
    for target in relative_links(doc):
        file, _, fragment = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(target)
        elif fragment and (dest.suffix != ".md" or fragment not in anchors(dest)):
            broken.append(target)
    assert not broken, broken


def test_the_readme_links_every_doc():
    readme = REPO / "README.md"
    linked = {(REPO / t.partition("#")[0]).resolve() for t in relative_links(readme)}
    assert set((REPO / "docs").glob("*.md")) <= linked

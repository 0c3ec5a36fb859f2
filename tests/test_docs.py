"""The documentation holds together: every relative link in README.md and docs/ reaches a file (and, for a Markdown
file, a heading when the link names one), and the README stays short enough to read."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
README_MAX_WORDS = 2000

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target), with an optional "title"; the target may be <wrapped in angle brackets>
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\(\s*(?P<target><[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[(?P<text>[^\]]+)\]:\s*(?P<target>\S+)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def prose_lines(path: Path):
    """(line number, line) outside fenced code blocks, with inline code blanked out."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, INLINE_CODE.sub(lambda m: "code", line)


def links(path: Path):
    """(line number, link text, target) of every link and image in ``path``."""
    for number, line in prose_lines(path):
        for match in LINK.finditer(line):
            yield number, match["text"], match["target"].strip("<>")
        if match := REFERENCE.match(line):
            yield number, match["text"], match["target"].strip("<>")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text without markup, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2, ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or not (match := re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)):
            continue
        base = slug(match[1])
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links() -> list[str]:
    problems = []
    for source in doc_files():
        for number, text, target in links(source):
            if EXTERNAL.match(target):
                continue
            where = f"{source.relative_to(REPO)}:{number}: [{text}]({target})"
            file_part, _, anchor = target.partition("#")
            file_part = unquote(file_part)
            if not file_part:
                resolved = source
            elif file_part.startswith("/"):
                resolved = REPO / file_part.lstrip("/")
            else:
                resolved = (source.parent / file_part).resolve()
            if not resolved.exists():
                problems.append(f"{where} -> no such file or directory: {resolved.relative_to(REPO.resolve())}"
                                if resolved.is_relative_to(REPO.resolve()) else f"{where} -> outside the repository")
            elif anchor and resolved.suffix == ".md" and unquote(anchor).lower() not in anchors(resolved):
                problems.append(f"{where} -> {resolved.name} has no heading with anchor #{anchor}")
    return problems


def test_every_relative_link_in_the_docs_resolves():
    problems = broken_links()
    assert not problems, f"{len(problems)} broken link(s) in README.md and docs/:\n" + "\n".join(problems)


def test_the_link_checker_sees_links_and_headings(tmp_path):
    """Guards the guard: a checker that found no links would pass anything."""
    assert sum(1 for source in doc_files() for _ in links(source)) > 50
    page = tmp_path / "page.md"
    page.write_text("# Privacy: the silo decides\n## Keys (`fdkt.*`)\n## Keys (`fdkt.*`)\n```\n# not a heading\n```\n"
                    "see [a](b.md#c) and ![img](d.png) but not `[e](f.md)`\n", encoding="utf-8")
    assert anchors(page) == {"privacy-the-silo-decides", "keys-fdkt", "keys-fdkt-1"}
    assert [(text, target) for _, text, target in links(page)] == [("a", "b.md#c"), ("img", "d.png")]


def test_readme_is_short():
    words = len((REPO / "README.md").read_text(encoding="utf-8").split())
    assert words <= README_MAX_WORDS, (f"README.md has {words} words, more than {README_MAX_WORDS}: move detail into "
                                       "docs/ and link it")

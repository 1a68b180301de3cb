"""The product pages agree with each other and stay product pages: every docs/ page is linked
from the README, every number the README states is one docs/results.md states (the results are
measured there, with their commands), and no page points outside the repository or to the
issue tracker."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def prose(text: str) -> str:
    """The text without its code blocks, inline code and link targets (commands and paths)."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", " ", text)
    return re.sub(r"\]\([^)]*\)", "]", text)


def numbers(text: str) -> set[str]:
    """The measured numbers of a text: decimals (0.483), thousands (8,891), fractions (32/32),
    percentages (19.3 %, 17 %) and times (330 s); not version requirements (>= 4.56)."""
    text = re.sub(r"[<>=]=\s*\d[\d.]*", " ", prose(text))
    found = set()
    for match in re.finditer(r"(?<![\w.,/])(\d{1,3}(?:,\d{3})+|\d+\.\d+|\d+/\d+|\d+(?= ?%)|\d+(?= s\b))"
                             r"( ?%| s\b)?", text):
        found.add(match.group(0))
    return found


def test_every_docs_page_is_linked_from_the_readme():
    readme = README.read_text(encoding="utf-8")
    for page in PAGES[1:]:
        link = page.relative_to(ROOT).as_posix()
        assert f"]({link}" in readme, link


def test_every_number_in_the_readme_is_one_of_the_results():
    results = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    found = numbers(README.read_text(encoding="utf-8"))
    assert len(found) >= 30                        # the results in brief are there, and read
    missing = sorted(n for n in found if n not in results and n.replace(" ", "") not in results)
    assert not missing, f"README numbers that docs/results.md does not give: {missing}"


def test_numbers_are_read_as_written():
    assert numbers("8,891 neurons (19.3 %), 32/32, 330 s, +54.5 %, 17 % and torch >= 2.1, `0.1234`") == \
        {"8,891", "19.3 %", "32/32", "330 s", "54.5 %", "17 %"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_page_points_outside_the_repository_or_to_the_tracker(page):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text and "/tmp" not in text and "/work/" not in text
    assert not re.search(r"\bissues?\b", text, re.I), "the product pages do not talk about issues"


def test_the_rollback_results_are_in_readme_and_results():
    for page in (README, ROOT / "docs" / "results.md"):
        text = page.read_text(encoding="utf-8")
        assert "<!-- ROLLBACK RESULTS -->" not in text and "14,788" in text and "27.1" in text, page.name

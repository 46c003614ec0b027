"""Every document the code cites is in the repository, at a section that exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"docs/(\w+)\.md sections? (\d+)(?:-(\d+))?")


def _sources():
    for folder in ("src", "tests", "benchmarks"):
        yield from (ROOT / folder).rglob("*.py")
    yield ROOT / "README.md"


def test_cited_doc_sections_exist():
    cited = 0
    for path in _sources():
        for doc, first, last in CITE.findall(path.read_text()):
            text = (ROOT / "docs" / f"{doc}.md").read_text()
            for n in range(int(first), int(last or first) + 1):
                assert re.search(rf"^## {n}\. ", text, re.M), f"{path}: docs/{doc}.md section {n}"
                cited += 1
    assert cited >= 5


GENERATED = {"report.md", "doc.md"}  # a checkpoint's report; a test's temporary file
MD = re.compile(r"[\w./-]+\.md\b")


def test_every_cited_markdown_file_is_in_the_repository():
    for path in _sources():
        if path == Path(__file__):
            continue
        for name in MD.findall(path.read_text()):
            here = (ROOT / name).exists() or (ROOT / "docs" / name).exists()
            assert here or name in GENERATED, f"{path} cites {name}, not in the repository"

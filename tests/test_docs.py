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


def test_no_citation_of_documents_outside_the_repository():
    for path in _sources():
        if path == Path(__file__):
            continue
        text = path.read_text()
        for name in ("ALGORITHM.md", "EVALUATION.md", "ARCHITECTURE.md", "shared/design"):
            assert name not in text, f"{path} cites {name}, which is not in the repository"

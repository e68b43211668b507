"""The documentation users get: it cites the repository's own docs, and the docs it cites exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = ["sslops", "triton_kernels", "csrc", "examples", "benchmarks", "docs"]
TEXT_SUFFIXES = {".py", ".cpp", ".cu", ".cuh", ".h", ".md"}


def _shipped_text_files():
    yield ROOT / "README.md"
    for top in SHIPPED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in TEXT_SUFFIXES and path.is_file():
                yield path


def test_no_citation_of_an_internal_spec():
    """Users have README.md and docs/, not the team's internal spec: nothing may cite it."""
    offenders = []
    for path in _shipped_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\bSPEC\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "cite docs/conventions.md or the README instead:\n" + "\n".join(offenders)


def test_cited_convention_sections_exist():
    """Every "conventions.md §N" cited in code or docs is a heading of docs/conventions.md."""
    headings = set(re.findall(r"^## §(\w+)", (ROOT / "docs" / "conventions.md").read_text(encoding="utf-8"), re.M))
    assert headings, "docs/conventions.md has no '## §N' headings"
    missing = []
    for path in _shipped_text_files():
        for section in re.findall(r"conventions(?:\.md)? §(\d\w*)", path.read_text(encoding="utf-8")):
            if section not in headings:
                missing.append(f"{path.relative_to(ROOT)}: §{section}")
    assert not missing, f"sections cited but not in docs/conventions.md ({sorted(headings)}):\n" + "\n".join(missing)

"""The README is a guide that fits on a few screens, and it and docs/ say what the code does: every link
resolves, every recipe field and every command is documented."""

from __future__ import annotations

import re
from pathlib import Path

from moe_merge.cli import build_parser
from moe_merge.config import MergeConfig, RouterSpec

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    out, fence = set(), False
    for line in page.read_text().splitlines():
        fence ^= line.startswith("```")
        if not fence and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_the_readme_is_a_guide():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for command in (
        "pip install torch==2.13.0 && pip install -e . && moe-merge demo",
        'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q -rs',
    ):
        assert command in text
    assert 'pip install -e ".[dev]" && python -m pytest -q -rs' in (ROOT / ".ci" / "run").read_text()


def test_every_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken


def test_the_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("# Title here\n\n[ok](#title-here) [bad](#nowhere)\n")
    assert anchors(page) == {"title-here"} and "nowhere" not in anchors(page)


def test_every_recipe_field_is_in_the_yaml_reference():
    reference = (ROOT / "docs" / "recipe.md").read_text()
    fields = set(MergeConfig.model_fields) | {f"router.{k}" for k in RouterSpec.model_fields}
    missing = [f for f in sorted(fields) if not re.search(rf"\b{re.escape(f.rpartition('.')[2])}\b", reference)]
    assert not missing


def test_every_command_is_documented():
    verbs = build_parser()._subparsers._group_actions[0].choices
    text = "\n".join(p.read_text() for p in PAGES)
    assert [v for v in verbs if f"moe-merge {v}" not in text] == []


def test_every_test_the_reliability_table_cites_exists():
    text = (ROOT / "docs" / "reliability.md").read_text()
    cited, file = [], None
    for match in re.finditer(r"`(test_\w+\.py)?::(test_\w+)`|`(test_\w+\.py)::(test_\w+)`", text):
        file = match.group(1) or match.group(3) or file  # `::name` continues the file named before it
        cited.append((file, match.group(2) or match.group(4)))
    assert len(cited) >= 10
    missing = [f"{f}::{t}" for f, t in cited if not re.search(rf"^def {t}\(", (ROOT / "tests" / f).read_text(), re.M)]
    assert not missing


def test_every_script_and_result_the_docs_cite_exists():
    text = "\n".join(p.read_text() for p in PAGES)
    paths = {p.rstrip(".,;:") for p in re.findall(r"\b((?:benchmarks|configs|examples|tests|\.ci)/[^\s`)'\"]+)", text)}
    paths = {p for p in paths if not set(p) & set("*<{")}  # patterns name families of files
    assert len(paths) >= 10
    missing = [p for p in sorted(paths) if not (ROOT / p).exists()]
    assert not missing

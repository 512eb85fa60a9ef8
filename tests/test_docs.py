"""The documentation stays true to the code: docs/configuration.md is what `make docs` generates from
the settings classes, and every relative link in README.md, SECURITY.md and docs/ leads somewhere."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", REPO / "SECURITY.md", *(REPO / "docs").glob("*.md")])
GUIDE = "monitoring-and-logging-guide.md"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate_configuration",
                                                  REPO / "docs" / "generate_configuration.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date() -> None:
    gen = _generator()
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == gen.render(), "docs/configuration.md is stale: run `make docs`"


def test_configuration_reference_lists_every_setting() -> None:
    from services.common import config

    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    gen = _generator()
    variables = {f"FASHION_{name.upper()}" for cls in gen.settings_classes(config) for name in cls.model_fields}
    assert variables, "no settings classes found"
    missing = sorted(v for v in variables if f"`{v}`" not in text)
    assert not missing, f"not in docs/configuration.md: {missing}"


def test_check_mode_reports_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen = _generator()
    out = tmp_path / "configuration.md"
    assert gen.main(["--output", str(out)]) == 0
    assert gen.main(["--check", "--output", str(out)]) == 0
    out.write_text(out.read_text(encoding="utf-8") + "edited by hand\n", encoding="utf-8")
    assert gen.main(["--check", "--output", str(out)]) == 1
    assert "make docs" in capsys.readouterr().err


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_somewhere(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(re.sub(r"```.*?```", "", text, flags=re.S)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        if not path and doc.name == GUIDE:  # copied unchanged: its contents list headings its text lost
            continue
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved.read_text(encoding="utf-8")):
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO)}: links to nothing: {broken}"


def test_readme_begins_with_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = readme.split("```", 2)[1]
    assert "make run" in first_block and "make test" in first_block
    assert len(readme.splitlines()) <= 200, "README is the newcomer's page: move depth to docs/"


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name != "configuration.md"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_docs_name_what_they_mean_instead_of_the_seed(doc: Path) -> None:
    """'The seed' meant the system our users run today; the docs name it and link the guide
    (docs/monitoring-and-logging-guide.md) instead. docs/configuration.md quotes the code."""
    text = doc.read_text(encoding="utf-8")
    assert not re.search(r"\bthe seed\b", text, flags=re.I), f"{doc.relative_to(REPO)} says 'the seed'"

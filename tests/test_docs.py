"""The README and docs/ keep their promises: links resolve, the README stays short, installs stay sane."""
from __future__ import annotations

import pathlib
import re

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
PAGES = [README, *DOCS]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
PINNED = ("torch", "torchvision", "timm")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code removed (links there are not links)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def _anchors(page: pathlib.Path) -> set[str]:
    """GitHub's heading anchors of a markdown page (lowercase, punctuation dropped, spaces -> '-')."""
    seen: dict[str, int] = {}
    anchors = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(page: pathlib.Path) -> list[str]:
    return [m.group(1) for line in _prose(page.read_text()) for m in LINK.finditer(line)]


def _pyproject_dependencies() -> list[Requirement]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    assert block, "pyproject.toml has no [project] dependencies list"
    return [Requirement(r) for r in re.findall(r'"([^"]+)"', block.group(1))]


def _constraints(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name}: {line!r} is not an exact pin"
            pins[req.name.lower()] = Version(spec.version)
    return pins


def test_there_are_docs_to_check():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    methods = ("tome", "evit", "topk", "spvit", "prune_merge", "sit", "atme", "cdcp", "cait")
    expected = {f"docs/methods/{m}.md" for m in methods} | {
        f"docs/{p}.md" for p in ("index", "training", "measurement", "results", "cli", "architecture")}
    assert expected <= names, f"missing pages: {sorted(expected - names)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: pathlib.Path):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif not dest.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_docs_do_not_point_outside_the_repository():
    # a user's clone has no ../shared: name such things in words, or link to the paper
    offenders = [p.relative_to(ROOT).as_posix() for p in PAGES if "shared/reference" in p.read_text()]
    assert not offenders, f"pages citing the team's reference notes by path: {offenders}"


def _quick_start_commands() -> list[str]:
    text = README.read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README has no '## Quick start' section"
    commands, fenced = [], False
    for line in section.group(1).splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif (fenced or line.startswith("    ")) and line.strip():
            commands.append(line.strip())
    return commands


def test_readme_is_short_with_two_quick_start_commands():
    lines = README.read_text().splitlines()
    assert len(lines) < 150, f"README.md has {len(lines)} lines; move detail to docs/"
    commands = _quick_start_commands()
    assert len(commands) == 2, f"the quick start must be exactly two commands, found {commands}"
    assert commands[0].endswith("vitslim compare") and commands[1].endswith("python -m pytest -q")
    for command in commands:  # unconstrained, pip resolves torch to a multi-GB CUDA build
        assert "-c constraints.txt" in command, command


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "export HF_HUB_OFFLINE=1" in ci and "set -euo pipefail" in ci
    assert _quick_start_commands()[1].replace("HF_HUB_OFFLINE=1 ", "") in ci


def test_pyproject_declares_ranges_and_constraints_pin_inside_them():
    deps = {r.name.lower(): r for r in _pyproject_dependencies()}
    for name in PINNED:
        assert name in deps, f"pyproject.toml does not declare {name}"
        assert not any(s.operator in ("==", "===") for s in deps[name].specifier), (
            f"pyproject.toml pins {deps[name]}: declare the supported range, pin in constraints.txt")
        assert any(s.operator == ">=" for s in deps[name].specifier), f"{deps[name]} has no lower bound"
    pins = _constraints("constraints.txt")
    for name, req in deps.items():
        assert name in pins, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt {name}=={pins[name]} is outside {req}"
    lowest_timm = next(s.version for s in deps["timm"].specifier if s.operator == ">=")
    assert Version(lowest_timm) <= pins["timm"]

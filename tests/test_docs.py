"""The documentation site (issue 31, item 1): the CLI reference generated from the parser covers
every option of every command, the site builds offline with --strict, every page is in the
navigation, and the README is a short front page whose links resolve."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from resfit.cli import build_parser
from resfit.core.config import OPTIONS, flag

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hook():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")  # fmt: skip
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _sections(page: str) -> dict[str, str]:
    """The page cut at each command's heading: {"resfit train": its text}."""
    parts = re.split(r"^## `(resfit[^`]*)` \{ #[^}]+ \}$", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_cli_reference_lists_every_option_of_every_command() -> None:
    hook = _hook()
    page = hook.render()
    sections = _sections(page)
    listed = hook.commands(build_parser())
    names = [name for name, _, _ in listed]
    assert {"resfit train", "resfit predict", "resfit serve", "resfit tune"} <= set(names)
    assert sorted(sections) == sorted(names)  # one section per command, nothing else
    for name, parser, _ in listed:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            shown = action.option_strings or [action.metavar or action.dest.upper()]
            for text in shown:
                assert f"`{text}`" in sections[name], (name, text)
            for choice in action.choices or ():
                assert f"`{choice}`" in sections[name], (name, text, choice)
    # Every option of the config, in train's section, with its default and its help.
    train = sections["resfit train"]
    rows = {line.split(" | ")[0].strip("| "): line for line in train.splitlines() if line.startswith("| `")}  # fmt: skip
    for info in OPTIONS.values():
        if not info.cli:
            continue
        if info.name == "data":
            key = "`DATA`"
        elif info.type is bool:
            key = f"`{'--no-' if info.default else '--'}{info.name.replace('_', '-')}`"
        else:
            key = f"`{flag(info.name)}`"
        assert key in rows, (info.name, key)
        first_words = " ".join(info.help.replace("%%", "%").split()[:4])
        assert first_words.split("`")[0] in rows[key], (info.name, rows[key])
        if info.type is not bool and info.default not in (None, ""):
            assert f"`{info.default}`" in rows[key], (info.name, rows[key])


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r"^\s*- [^:]+: (\S+\.md)\s*$", nav, flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - listed == set(), "add these pages to the nav in mkdocs.yml"
    assert listed - pages == {"reference/cli.md"}  # the one generated at build time


def test_the_readme_is_a_front_page_whose_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block[0].startswith("make demo") and first_block[1].startswith("make test")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert len(links) >= 15
    for link in links:
        assert "://" not in link, link  # relative: they work on GitHub and in a clone
        target = ROOT / link.split("#")[0]
        assert target.exists(), link


def test_the_site_builds_offline_with_strict(tmp_path: Path) -> None:
    """``make docs``' build, into a temporary folder, with every proxy pointing nowhere: a
    plugin that fetched anything would fail. The pages must not load anything from the web."""
    pytest.importorskip("mkdocs", reason="needs the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("material", reason="needs the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="needs the docs extra: pip install -e '.[docs]'")
    nowhere = "http://127.0.0.1:9"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HTTP_PROXY": nowhere,
           "HTTPS_PROXY": nowhere, "http_proxy": nowhere, "https_proxy": nowhere,
           "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    cli = (site / "reference" / "cli.html").read_text()
    assert "resfit-train" in cli and "--early-stopping" in cli
    api = (site / "reference" / "api.html").read_text()
    assert "Predictor" in api and "from_run" in api and "export_run" in api
    for page in site.rglob("*.html"):
        html = page.read_text()
        external = re.findall(r'<(?:script|link|img)[^>]+(?:src|href)="(https?://[^"]+)"', html)
        assert external == [], (page.name, external[:3])
    assert not (site / "hooks").exists()

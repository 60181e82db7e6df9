"""The CLI reference page, generated when the site is built (a MkDocs hook).

``resfit``'s parser is built from :data:`resfit.core.config.OPTIONS` (every option's help, type,
choices and default are written once, in ``core/config.py``), so the reference walks that very
parser: every command, every argument group, every option with its default, choices and help.
Nothing is written into ``docs/``: the page is added to the build as a generated file.

It also shows the docstrings' Sphinx roles as code in the API reference.

``python docs/hooks/cli_reference.py`` prints the page (the test imports :func:`render`).
"""

from __future__ import annotations

import argparse
import html
import re
import sys
from pathlib import Path
from typing import Any

PAGE = "reference/cli.md"

try:  # the installed package (make docs); else the source tree beside this file
    from resfit.cli import build_parser
    from resfit.core.config import OPTIONS
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from resfit.cli import build_parser
    from resfit.core.config import OPTIONS

INTRO = """# CLI reference

Generated from the parser of `resfit` itself when this site is built: the options of `train`,
`lr-find` and `tune` come from `resfit.core.config.OPTIONS`, where each option's help, default,
choices and bounds are written once (the same metadata makes the flags and the checks).
`resfit COMMAND --help` prints the same on the command line. A flag written `--no-X` turns off
something that is on by default.
"""


def _text(value: str) -> str:
    """Markdown for a table cell: HTML escaped outside code spans, pipes escaped, one line."""
    parts = " ".join(value.split()).split("`")
    for i in range(0, len(parts), 2):  # even parts are outside backticks
        parts[i] = html.escape(parts[i], quote=False)
    return "`".join(parts).replace("|", "\\|")


def _name(action: argparse.Action) -> str:
    if action.option_strings:
        return ", ".join(f"`{s}`" for s in action.option_strings)
    return f"`{action.metavar or action.dest.upper()}`"


def _default(action: argparse.Action) -> str:
    """The default shown: the config's for generated options (their argparse default is
    SUPPRESS, so that an option the user did not give stays unset), none for plain flags."""
    if isinstance(action, argparse._StoreConstAction | argparse._StoreTrueAction):
        return ""
    default: Any = action.default
    if default is argparse.SUPPRESS:
        info = OPTIONS.get(action.dest)
        default = info.default if info is not None else None
    if default is None or default == "" or default == []:
        return ""
    return f"`{default}`"


def _choices(action: argparse.Action) -> str:
    if action.choices is None or isinstance(action, argparse._SubParsersAction):
        return ""
    return ", ".join(f"`{c}`" for c in action.choices)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if action.help in (None, argparse.SUPPRESS):
        return ""
    # argparse's own expansion (%(default)s, %%), with the plain formatter: predict's
    # formatter would import torch to list the installed engines.
    formatter = argparse.HelpFormatter(parser.prog)
    params = {**vars(action), "prog": parser.prog}
    if params.get("default") is argparse.SUPPRESS:
        info = OPTIONS.get(action.dest)
        params["default"] = info.default if info is not None else ""
    try:
        return action.help % params  # type: ignore[operator]
    except (KeyError, TypeError, ValueError):
        return formatter._expand_help(action)


def _tables(parser: argparse.ArgumentParser) -> list[str]:
    """A table per argument group: option, default, choices, help."""
    out: list[str] = []
    for group in parser._action_groups:
        actions = [
            a
            for a in group._group_actions
            if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)
        ]
        if not actions:
            continue
        title = f"**{_text(group.title or 'options')}**"
        out += [title + (f": {_text(group.description)}" if group.description else ""), ""]
        out += ["| option | default | choices | what it does |", "|---|---|---|---|"]
        for a in actions:
            row = [_name(a), _default(a), _choices(a), _text(_help(parser, a))]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return out


def _anchor(name: str) -> str:
    return name.replace(" ", "-")


def _command(parser: argparse.ArgumentParser, name: str, summary: str) -> list[str]:
    """The section of one command: what it does, its usage, its tables."""
    out = [f"## `{name}` {{ #{_anchor(name)} }}", ""]
    if parser.description or summary:
        out += [_text(parser.description or summary), ""]
    usage = parser.format_usage().strip().removeprefix("usage: ")
    return out + ["```text", usage, "```", ""] + _tables(parser)


def commands(
    parser: argparse.ArgumentParser, prefix: str = "resfit"
) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """Every command below ``parser`` (subcommands too) as (full name, parser, one-line
    help), in the parser's order."""
    found: list[tuple[str, argparse.ArgumentParser, str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((f"{prefix} {name}", sub, helps.get(name, "")))
                found += commands(sub, f"{prefix} {name}")
    return found


def render() -> str:
    """The whole page: the commands, the global options, then each command."""
    root = build_parser()
    listed = commands(root)
    out = [INTRO, "| command | what it does |", "|---|---|"]
    out += [f"| [`{n}`](#{_anchor(n)}) | {_text(s)} |" for n, _, s in listed]
    out += ["", "## Global options", "", "Before the command: `resfit [-v] [--threads N] COMMAND ...`", ""]  # fmt: skip
    out += _tables(root)
    for name, parser, summary in listed:
        out += _command(parser, name, summary)
    return "\n".join(out) + "\n"


_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):<code>(~?)([^<]+)</code>")


def on_page_content(html_text: str, **_: Any) -> str:
    """MkDocs hook: the docstrings' Sphinx roles (``:func:`~resfit.x.y```) shown as code, the
    short name where the role asks for it (``~``), instead of the role's raw text."""
    return _ROLE.sub(
        lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>",
        html_text,
    )


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: add the generated page to the build."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    sys.stdout.write(render())

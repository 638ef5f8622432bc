"""Regenerate the README's reference tables from the code, so that they cannot drift from it: the train
config's keys (the defaults and help of `TrainConfig`'s fields) and the flags of text_to_image.py and of
the tools users run (their argparse parsers).

    python -m tools.dev.readme_reference           # rewrite the tables in README.md
    python -m tools.dev.readme_reference --check   # exit 1 if they are out of date (tests/test_readme.py)

Each table sits between a `<!-- generated: NAME -->` line and an `<!-- end generated -->` line; the text
around them is written by hand.
"""
import argparse
import dataclasses
import importlib
import os
import re
import sys
from unittest import mock

import text_to_image
from ldm.checkpoint_io import atomic_write
from ldm.training.config import IGNORED_MINDONE_KEYS, TrainConfig
from tools import ROOT

README = os.path.join(ROOT, "README.md")
# the tools users run, in the README's order
USER_TOOLS = ("convert_embedding", "inspect_checkpoint", "evaluate_ti", "editability_study", "check_full_size",
              "benchmark_train_step", "benchmark_sampling", "benchmark_ops")
BLOCK = re.compile(r"^<!-- generated: (\S+) -->\n.*?^<!-- end generated -->$", re.S | re.M)


class _Parsing(Exception):
    """Raised where a command line would be parsed; carries the parser."""


def parser_of(build_and_parse):
    """The ArgumentParser that `build_and_parse()` builds, stopped before it parses (nothing else runs)."""
    def stop(parser, *args, **kwargs):
        raise _Parsing(parser)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            build_and_parse()
        except _Parsing as parsing:
            return parsing.args[0]
    raise RuntimeError(f"{build_and_parse.__module__}.{build_and_parse.__name__} parses no command line")


def _cell(text):
    """Help text as one table cell: one line, `|` escaped, `<token>` shown rather than read as HTML."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


def _code(value):
    return f"`{value}`" if value != "" else ""


def _what(help_text, choices, several=False):
    parts = [_cell(help_text)] if help_text else []
    if choices:
        parts.append(("one or more of " if several else "one of ") + ", ".join(f"`{c}`" for c in choices))
    elif several:
        parts.append("one or more values")
    return "; ".join(parts)


def _yaml_value(value):
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return _code(str(value).lower())
    if isinstance(value, tuple):
        return _code("[" + ", ".join(map(str, value)) + "]")
    return _code(value)


def train_keys():
    rows = ["| key | default | what |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        rows.append(f"| `{f.name}` | {_yaml_value(f.default)} | {_what(f.metadata['help'], f.metadata['choices'])} |")
    ignored = ", ".join(f"`{key}` ({why})" for key, why in IGNORED_MINDONE_KEYS.items())
    return "\n".join(rows) + f"\n\nmindone keys accepted and ignored, with a warning: {_cell(ignored)}."


def _flag_default(action):
    if action.required:
        return "required"
    if action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS:
        return ""
    if isinstance(action.default, (list, tuple)):
        return _code(" ".join(map(str, action.default)))
    return _code(action.default)


def flag_table(parser):
    """One row per flag or positional argument the parser's --help shows."""
    rows = ["| flag | default | what |", "|---|---|---|"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        name = ", ".join(action.option_strings) or action.dest
        # argparse's own expansion of %(default)s and friends in a help string
        help_text = action.help % dict(vars(action), prog=parser.prog) if action.help else ""
        what = _what(help_text, action.choices, several=action.nargs in ("+", "*"))
        rows.append(f"| `{name}` | {_flag_default(action)} | {what} |")
    return "\n".join(rows)


def text_to_image_flags():
    return flag_table(parser_of(text_to_image.parse_args))


def tool_flags():
    parts = []
    for name in USER_TOOLS:
        parser = parser_of(importlib.import_module(f"tools.{name}").main)
        summary = _cell((parser.description or "").strip().splitlines()[0])
        parts.append(f"#### `python -m tools.{name}`\n\n{summary}\n\n{flag_table(parser)}")
    return "\n\n".join(parts)


SECTIONS = {"train-keys": train_keys, "text-to-image-flags": text_to_image_flags, "tool-flags": tool_flags}


def render(readme_text):
    """The README with every generated block rewritten from the code."""
    def block(match):
        name = match.group(1)
        if name not in SECTIONS:
            raise SystemExit(f"README.md: unknown generated block {name!r}; known: {', '.join(SECTIONS)}")
        return f"<!-- generated: {name} -->\n\n{SECTIONS[name]()}\n\n<!-- end generated -->"

    return BLOCK.sub(block, readme_text)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.dev.readme_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether README.md is up to date")
    args = parser.parse_args(argv)
    with open(README, encoding="utf-8") as f:
        text = f.read()
    fresh = render(text)
    if args.check:
        print("README.md is up to date" if fresh == text else "README.md is out of date: run "
              "python -m tools.dev.readme_reference")
        return 0 if fresh == text else 1
    if fresh != text:
        with atomic_write(README) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(fresh)
    print("README.md " + ("rewritten" if fresh != text else "already up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

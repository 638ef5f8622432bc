"""The README stays true to the code: its Reference tables are generated from it, the scripts and tool modules
its commands (and the docs') name exist, and its test command is the one .ci/run runs."""
import glob
import importlib.util
import os
import re

from tools import ROOT
from tools.dev import readme_reference

DOCUMENTS = [readme_reference.README, *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_reference_tables_are_the_codes():
    text = _read(readme_reference.README)
    assert len(readme_reference.BLOCK.findall(text)) == len(readme_reference.SECTIONS)
    assert readme_reference.render(text) == text, \
        "README.md's Reference is out of date: run python -m tools.dev.readme_reference"


def _commands(text):
    """(tool modules run with `python -m`, scripts run as `python X.py`) of a document's commands."""
    return (set(re.findall(r"python -m (tools(?:\.[a-z_]+)+)", text)),
            set(re.findall(r"python ([\w/.-]+\.py)\b", text)))


def test_commands_name_existing_scripts_and_modules():
    modules, scripts = _commands(_read(readme_reference.README))
    assert "tools.evaluate_ti" in modules and "text_to_image.py" in scripts   # the patterns see the commands
    for path in DOCUMENTS:
        modules, scripts = _commands(_read(path))
        for module in modules:
            assert importlib.util.find_spec(module) is not None, f"{path}: no module {module}"
        for script in scripts:
            assert os.path.isfile(os.path.join(ROOT, script)), f"{path}: no script {script}"


def test_ci_runs_the_readme_test_command():
    command = re.search(r"^## Tests\n\n```bash\n(.+)\n```", _read(readme_reference.README), re.M).group(1)
    assert command in _read(os.path.join(ROOT, ".ci", "run")).splitlines()

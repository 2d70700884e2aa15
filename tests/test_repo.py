"""The repository's promises about itself: CI runs exactly the README's test command."""

import re
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    match = re.search(r"^TEST_CMD='([^']+)'", ci, re.M)
    assert match, "the TEST_CMD line is missing from .ci/run"
    readme_commands = [line.split("#")[0].strip() for line in (REPO / "README.md").read_text().splitlines()]
    assert match.group(1) in readme_commands, "README.md must give the test command that .ci/run runs"

"""The code in README.md and docs/ runs as written, and says what it claims."""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import Phase, settings

ROOT = Path(__file__).resolve().parents[1]


def code_blocks(path: Path, section: str) -> list[str]:
    """The ```python blocks of the Markdown section whose heading is ``section``
    (its subsections included)."""
    text = path.read_text()
    start = text.index(f"\n{section}\n")
    level = section.split()[0]
    following = re.search(rf"\n#{{1,{len(level)}}} ", text[start + 1 :])
    body = text[start : start + 1 + following.start()] if following else text[start:]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def _readme_test(code: str):
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    # A fixed search, so that the verdict does not depend on the profile or
    # luck; no shrinking, as only the verdict matters here.
    fixed = settings(
        max_examples=200,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        report_multiple_bugs=False,
    )
    return fixed(namespace["test_my_syncbn"])


# -- issue 7, item 15 ------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_readme_testing_snippet_runs_and_catches_the_variance_bug() -> None:
    (code,) = code_blocks(ROOT / "README.md", "## Testing your own SyncBN")
    with pytest.raises(AssertionError, match="exceed the bound"):
        _readme_test(code)()


def test_readme_testing_snippet_passes_with_the_fix_it_names() -> None:
    """The second pass the README offers as the fix passes the same test: the
    snippet fails for the bug, not for something else."""
    section = (ROOT / "README.md").read_text().split("## Testing your own SyncBN")[1]
    fix = re.search(r"`(var = sum\(.*?)`", section, re.S)
    assert fix is not None, "the README no longer names the fix"
    (code,) = code_blocks(ROOT / "README.md", "## Testing your own SyncBN")
    bug = re.search(r"\n( +)var = square - mean\*\*2.*\n", code)
    assert bug is not None, "the README's snippet no longer has the bug line"
    fixed = code.replace(bug.group(0), f"\n{bug.group(1)}{fix.group(1)}\n")
    _readme_test(fixed)()


def test_readme_install_lists_every_extra() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = list(config["options.extras_require"])
    install = (ROOT / "README.md").read_text().split("## Install")[1].split("\n## ")[0]
    missing = [e for e in extras if f".[{e}]" not in install]
    assert not missing, f"README's Install section omits the extras {missing}"


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="needs mpi4py")
@pytest.mark.parametrize("section", ["## Using SyncBN in your own MPI job", "### Subgroups"])
def test_mpi_docs_snippets_run_as_written(section: str) -> None:
    """In a world of one (no mpiexec): the snippet must at least import and build."""
    code = code_blocks(ROOT / "docs" / "mpi.md", section)[0]  # subsections have their own
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARRAYSYNCBN_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code + "\nprint('snippet ran', bn.num_features)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "snippet ran 64" in out.stdout

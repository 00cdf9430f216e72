"""The nightly recipe in docs/scoring.md is the RayCronJob's entrypoint (infra/k8s/raycronjob-scoring.yaml), command
for command: the same commands, the same arguments in the same order (line breaks aside: the docs continue lines
with a backslash, the manifest folds them)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _words(command: str) -> list[str]:
    return shlex.split(command, posix=False)


def recipe_commands() -> list[list[str]]:
    """The commands of the docs' bash block that sets TODAY and runs `stylid score` (comments and the closing
    `echo` of the exit code left out)."""
    text = (ROOT / "docs" / "scoring.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "TODAY=" in b and "stylid score" in b]
    assert len(blocks) == 1, "docs/scoring.md should have exactly one nightly recipe block"
    lines = blocks[0].replace("\\\n", " ").splitlines()
    commands = [line.split("   #")[0].strip() for line in lines]
    return [_words(c) for c in commands if c and not c.startswith(("#", "echo "))]


def cronjob_commands() -> list[list[str]]:
    manifest = yaml.safe_load((ROOT / "infra" / "k8s" / "raycronjob-scoring.yaml").read_text())
    entrypoint = manifest["spec"]["jobTemplate"]["entrypoint"]
    match = re.fullmatch(r"bash -c '(.*)'", entrypoint.strip(), re.S)
    assert match, f"the entrypoint is not one bash -c '...' script: {entrypoint!r}"
    commands = [c.strip() for c in match.group(1).split(";")]
    return [_words(c) for c in commands if c and c != "set -e"]


def test_the_docs_nightly_recipe_is_the_raycronjobs_entrypoint():
    docs, cron = recipe_commands(), cronjob_commands()
    assert [w[:2] for w in cron] == [["TODAY=$(date", "-u"], ["stylid", "run"], ["stylid", "score"]]
    assert docs == cron


def test_the_comparison_sees_a_drifted_argument():
    cron = cronjob_commands()
    drifted = [[w.replace("scores/", "score/") for w in c] for c in cron]
    assert drifted != cron  # the test above would fail on a recipe whose --baseline named another prefix

"""The README's 60-second tour, run as a newcomer runs it: its commands in a fresh folder beside a real
`imgclf serve`, their output compared with what the README shows.

What may differ between runs is masked: timings, throughput, worker counts; floating-point figures may
differ in the last digits across CPUs. A changed field, label, count, message or line fails the test.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgclf.devserver import running_server
from tests.support import ROOT

pytestmark = pytest.mark.slow

TOUR = "## A 60-second tour"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")
# Spans of a text line that depend on the machine or the moment, masked before comparing.
VOLATILE = [re.compile(p) for p in (r", \d+ s$", r"in [\d.]+s = [\d.]+ img/s", r"\d+ workers?")]
FLOAT_TOLERANCE = 0.02  # scores and metrics: identical here, close on another CPU
VOLATILE_KEYS = {"timing_ms"}


def tour_steps(readme: str) -> list[tuple[str, str]]:
    """(command, expected stdout) for every `$ ` line of the tour's console blocks."""
    section = readme.split(TOUR, 1)[1].split("\n## ", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", section, flags=re.DOTALL):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps:
                steps[-1][1].append(line)
    return [(command, "\n".join(lines).strip()) for command, lines in steps]


def masked(line: str) -> str:
    for pattern in VOLATILE:
        line = pattern.sub("<volatile>", line)
    return line


def assert_same_text(got: str, expected: str) -> None:
    """Line by line: the words equal, the numbers equal (floats within FLOAT_TOLERANCE)."""
    got_lines, expected_lines = got.strip().splitlines(), expected.strip().splitlines()
    assert len(got_lines) == len(expected_lines), f"got:\n{got}\nREADME:\n{expected}"
    for mine, theirs in zip(got_lines, expected_lines, strict=True):
        mine, theirs = masked(mine), masked(theirs)
        assert NUMBER.sub("#", mine) == NUMBER.sub("#", theirs), f"got:\n{mine}\nREADME:\n{theirs}"
        for a, b in zip(NUMBER.findall(mine), NUMBER.findall(theirs), strict=True):
            same = a == b or ("." in a + b and math.isclose(float(a), float(b), abs_tol=FLOAT_TOLERANCE))
            assert same, f"{a} != {b} in\n{mine}\nREADME:\n{theirs}"


def assert_same_json(got: object, expected: object, where: str = "") -> None:
    """Same keys and strings; numbers within FLOAT_TOLERANCE (integers exact); VOLATILE_KEYS only present."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), f"{where}: {got} vs README {expected}"
        for key in expected:
            if key not in VOLATILE_KEYS:
                assert_same_json(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), f"{where}: {got} vs README {expected}"
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same_json(a, b, f"{where}[{i}]")
    elif isinstance(expected, float) or isinstance(got, float):
        assert math.isclose(got, expected, abs_tol=FLOAT_TOLERANCE), f"{where}: {got} vs README {expected}"
    else:
        assert got == expected, f"{where}: {got!r} vs README {expected!r}"


def assert_same_output(got: str, expected: str) -> None:
    if expected.startswith("{"):
        assert_same_json(json.loads(got), json.loads(expected))
    else:
        assert_same_text(got, expected)


@pytest.fixture
def newcomer(imagenet_repo: Path, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A fresh folder with the bootstrapped repository in `models/` (what `make serve` makes) and the
    server `make serve` starts on it (all settings at their defaults, on a free port instead of 3000)."""
    work = tmp_path / "newcomer"
    shutil.copytree(imagenet_repo, work / "models")
    with running_server(work / "models", tmp_path / "home") as server:
        yield work, server.url.removeprefix("http://")


def test_the_tour_runs_as_the_readme_shows(newcomer: tuple[Path, str]) -> None:
    work, address = newcomer
    steps = tour_steps((ROOT / "README.md").read_text())
    assert len(steps) >= 8, steps  # photos, two requests, train, export, the batch folder, batch, head
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a newcomer's shell has it
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    for command, expected in steps:
        run = subprocess.run(command.replace("localhost:3000", address), shell=True, cwd=work, env=env,
                             capture_output=True, text=True, timeout=600, check=False)
        assert run.returncode == 0, f"$ {command}\n{run.stderr[-3000:]}"
        assert_same_output(run.stdout, expected)


def test_the_comparison_catches_a_changed_output() -> None:
    """The checks above fail on what a drifted README shows, and pass over what is volatile."""
    answer = {"model": "m", "version": 1, "label": "tiger cat", "predictions": [{"label": "tiger cat", "score": 0.39}],
              "timing_ms": {"total": 21.9}}
    assert_same_json({**answer, "timing_ms": {"total": 3.0}}, answer)
    for drifted in ({k: v for k, v in answer.items() if k != "label"}, {**answer, "label": "tabby"},
                    {**answer, "predictions": [{"label": "tiger cat", "score": 0.5}]}):
        with pytest.raises(AssertionError):
            assert_same_json(answer, drifted)
    line = "runs/lenet5: val top-1 0.9861, top-5 1.0000, best epoch 10/15, ECE 0.0194 -> 0.0193 (T=1.029), 16 s"
    assert_same_text(line.replace("16 s", "41 s"), line)
    for drifted in (line.replace("10/15", "9/15"), line.replace("0.9861", "0.9361"), line.replace("ECE", "ece")):
        with pytest.raises(AssertionError):
            assert_same_text(drifted, line)

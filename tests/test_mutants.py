"""tools/mutants.py stays runnable as code moves: every mutant's snippet
occurs exactly once in its file, and its tests exist (the mutants themselves
run in ``make mutants``)."""

from __future__ import annotations

import os

import pytest

from tools import mutants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=[m[0] for m in mutants.MUTANTS])
def test_snippet_occurs_once_and_tests_exist(mutant):
    name, path, old, new, tests = mutant
    with open(os.path.join(ROOT, path)) as f:
        assert f.read().count(old) == 1, f"{name}: snippet not found exactly once in {path}"
    assert old != new
    for t in tests:
        assert os.path.exists(os.path.join(ROOT, t.split("::")[0])), t

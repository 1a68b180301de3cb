"""The transformers-internal speed-ups are used only where they were tested, and can be switched
off (their fallbacks give the same numbers: see test_measure.py and test_neighbors.py)."""
import pytest

from neumuter_cli import fastpaths


def test_used_with_the_tested_transformers_only(monkeypatch):
    monkeypatch.delenv("NEUMUTER_NO_FASTPATHS", raising=False)
    assert fastpaths.enabled()  # the installed transformers is one the fast paths were written for
    for version, expected in [((4, 55), False), ((4, 56), True), ((5, 99), True), ((6, 0), False), (None, False)]:
        monkeypatch.setattr(fastpaths, "transformers_version", lambda version=version: version)
        assert fastpaths.enabled() is expected, version


@pytest.mark.parametrize("value,expected", [("1", False), ("0", True), ("", True)])
def test_switched_off_by_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("NEUMUTER_NO_FASTPATHS", value)
    assert fastpaths.enabled() is expected


def test_disabled_nests_and_restores(monkeypatch):
    monkeypatch.delenv("NEUMUTER_NO_FASTPATHS", raising=False)
    with fastpaths.disabled():
        with fastpaths.disabled():
            assert not fastpaths.enabled()
        assert not fastpaths.enabled()
    assert fastpaths.enabled()

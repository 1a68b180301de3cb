"""`neumuter` as one process of a launcher, with a failure injected on one of them (for
tests/test_distributed.py): the process whose RANK is NEUMUTER_TEST_FAIL_RANK raises a
NeumuterError("injected failure") at its NEUMUTER_TEST_FAIL_CALL-th neighbour KL, that is in
the middle of `localize`'s training, while the other processes wait in a collective."""
import os

from neumuter_cli import NeumuterError, localize
from neumuter_cli.cli import main

if os.environ.get("RANK") == os.environ.get("NEUMUTER_TEST_FAIL_RANK"):
    original, calls = localize.neighbour_kl, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= int(os.environ.get("NEUMUTER_TEST_FAIL_CALL", "1")):
            raise NeumuterError("injected failure")
        return original(*args, **kwargs)

    localize.neighbour_kl = failing

main()

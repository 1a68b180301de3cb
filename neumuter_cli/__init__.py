"""neumuter: make a causal LM forget specific texts by muting the FFN neurons that hold them."""

__version__ = "0.1.0"


class NeumuterError(Exception):
    """An error the user can fix (bad input, wrong model, unreadable path): printed as one line."""

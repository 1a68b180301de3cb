"""Errors of the library that the command line words in its own terms.

The library states the plain fact and names its own parameter; only the CLI knows which flag
sets that parameter (`neumuter localize --lr`, `neighbors --top-k`, ...) and says so."""
from __future__ import annotations

from . import NeumuterError


class SettingError(NeumuterError):
    """A setting cannot work: ``setting`` is the library's parameter name (``top_k``,
    ``layers``, ``device``, ...), ``problem`` what is wrong with its value."""

    def __init__(self, setting: str, problem: str):
        self.setting, self.problem = setting, problem
        super().__init__(f"{setting} {problem}")


class DeviceUnavailable(SettingError):
    """The device asked for does not exist on this machine."""

    def __init__(self, device: str, problem: str):
        self.device = device
        super().__init__("device", f"{device} asked for, but {problem}")


class NonFiniteLoss(NeumuterError):
    """Training produced a NaN or infinite loss (a step too large, or a dtype too coarse)."""


class NonFiniteOutput(NeumuterError):
    """The model computed a NaN or infinite logit or loss on sequence ``index`` (0-based, in the
    order the sequences were given; at ``token``, 1-based, when known): its weights are broken,
    and no number it gives means anything. The caller names the record."""

    def __init__(self, index: int, token: int | None = None):
        self.index, self.token = index, token
        where = f" at token {token}" if token is not None else ""
        self.problem = (f"computes a non-finite logit or loss{where} (NaN or infinity): its weights are broken, "
                        "so no number it gives means anything")
        super().__init__(f"sequence {index + 1}: the model {self.problem}")


class FingerprintMismatch(NeumuterError):
    """A file made for one model (its ``expected`` fingerprint) was given with another model
    (``found``)."""

    def __init__(self, expected: str | None, found: str, message: str):
        self.expected, self.found = expected, found
        super().__init__(message)


__all__ = ["NeumuterError", "SettingError", "DeviceUnavailable", "NonFiniteLoss", "NonFiniteOutput",
           "FingerprintMismatch"]

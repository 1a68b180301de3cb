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


__all__ = ["NeumuterError", "SettingError", "DeviceUnavailable", "NonFiniteLoss"]

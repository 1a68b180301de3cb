"""The settings of the stages as plain dataclasses, and nothing else: importing this module must
not import torch or transformers (the CLI builds its options and --help from these defaults,
and `neumuter --help` has to be instant). Each default is written here once."""
from __future__ import annotations

from dataclasses import dataclass

FORGET_TERMS = ("hinge", "bounded", "ascent")
LOCALIZE_METHODS = ("gates", "attribution")
ATTRIBUTION_SCORES = ("gradient", "specific", "specific-smoothed", "both")
OPTIMIZERS = ("shared-adam", "adam")

#: the llama.cpp block formats `measure --quantize` offers: name -> gguf GGMLQuantizationType member
QUANT_TYPES = {"q8_0": "Q8_0", "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_0": "Q4_0", "q4_1": "Q4_1",
               "mxfp4": "MXFP4"}


@dataclass
class LocalizeConfig:
    epochs: int = 100
    lr: float = 0.5
    kl_weight: float = 3.0           # λ
    l0_weight: float = 0.1           # η
    beta: float = 1 / 3
    forget_term: str = "hinge"       # hinge | bounded | ascent
    max_forget_loss: float = 8.0     # the bound of "bounded" (public code)
    margin: float = 1.0              # the margin of "hinge", in logits
    target_ma: float = 0.0           # "hinge": a text whose MA is at or below this is left alone
    max_length: int = 200
    batch_size: int = 1
    kl_top_k: int = 256              # 0: full vocabulary
    seed: int = 0
    check_every: int = 1             # epochs between forgetting checks (one teacher-forced pass each)
    straight_through: bool = True    # gradient through the upper clamp of the gate
    optimizer: str = "adam"          # adam: a step per gate | shared-adam: one step size for all gates
    prune: bool = True               # after a passing check, keep the smallest top-ranked set that still passes
    method: str = "gates"            # gates: train Hard-Concrete gates | attribution: per-text rankings (attribution.py)
    max_per_text: int = 460          # attribution: the longest prefix of a text's ranking that is tried
    contrast: float = 0.0            # attribution: weight of the neighbours' attribution subtracted
    score: str = "gradient"          # attribution: gradient | specific | specific-smoothed | both (attribution.SCORES)
    shrink_rounds: int = 0           # attribution: rounds of cutting each prefix to what it needs beside the others


@dataclass
class NeighborsConfig:
    """How `neumuter neighbors` rewrites each text (see neighbors.py).

    The paper uses K = 5, r = 1 with an argmax BERT; the authors' code K = 1, r = 1. These
    defaults were chosen by running localize on the fixtures with each kind of neighbour
    (docs/results.md, "Neighbours"): sampled neighbours keep the model's general ability far better than
    argmax ones (argmax at r = 1 collapses into "- - -" with a weak MLM), and r = 0.5 keeps
    the form of the text."""

    k: int = 1                    # neighbours per record
    ratio: float = 0.5            # share of the MLM tokens rewritten, in (0, 1]
    temperature: float = 1.0      # 0 = argmax (greedy)
    top_k: int = 20               # 0 = the whole vocabulary (when sampling)
    batch_size: int = 32          # sequences advanced by one MLM call
    seed: int = 0                 # position choice and sampling


@dataclass
class RelearnConfig:
    """How `neumuter relearn` fine-tunes (see relearn.py)."""

    steps: int = 20
    lr: float = 3e-5
    batch_size: int = 4
    layers: str | None = None        # block SPEC as for `localize --layers` ("10-16,21"); None: every weight
    max_length: int = 200
    seed: int = 0


__all__ = ["FORGET_TERMS", "LOCALIZE_METHODS", "OPTIMIZERS", "QUANT_TYPES", "LocalizeConfig", "NeighborsConfig", "RelearnConfig"]

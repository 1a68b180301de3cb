"""The settings of the stages as plain dataclasses, and nothing else: importing this module must
not import torch or transformers (the CLI builds its options and --help from these defaults,
and `neumuter --help` has to be instant). Each default is written here once."""
from __future__ import annotations

from dataclasses import dataclass

FORGET_TERMS = ("hinge", "bounded", "ascent")


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
    check_every: int = 5             # epochs between forgetting checks (when a check is given)
    straight_through: bool = True    # gradient through the upper clamp of the gate


@dataclass
class NeighborsConfig:
    """How `neumuter neighbors` rewrites each text (see neighbors.py).

    The paper uses K = 5, r = 1 with an argmax BERT; the authors' code K = 1, r = 1. These
    defaults were chosen by running localize on the fixtures with each kind of neighbour
    (README, "Neighbours"): sampled neighbours keep the model's general ability far better than
    argmax ones (argmax at r = 1 collapses into "- - -" with a weak MLM), and r = 0.5 keeps
    the form of the text."""

    k: int = 1                    # neighbours per record
    ratio: float = 0.5            # share of the MLM tokens rewritten, in (0, 1]
    temperature: float = 1.0      # 0 = argmax (greedy)
    top_k: int = 20               # 0 = the whole vocabulary (when sampling)
    batch_size: int = 32          # sequences advanced by one MLM call
    seed: int = 0                 # position choice and sampling


__all__ = ["FORGET_TERMS", "LocalizeConfig", "NeighborsConfig"]

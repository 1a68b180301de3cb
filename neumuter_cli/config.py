"""The settings of the stages as plain dataclasses, and nothing else: importing this module must
not import torch or transformers (the CLI builds its options and --help from these defaults,
and `neumuter --help` has to be instant). Each default is written here once."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from . import NeumuterError
from .errors import ConflictingSettings, SettingError

FORGET_TERMS = ("hinge", "bounded", "ascent")
LOCALIZE_METHODS = ("gates", "attribution")
ATTRIBUTION_SCORES = ("specific-smoothed", "specific", "gradient", "both")
OPTIMIZERS = ("shared-adam", "adam")

#: the llama.cpp block formats `measure --quantize` offers: name -> gguf GGMLQuantizationType member
QUANT_TYPES = {"q8_0": "Q8_0", "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_0": "Q4_0", "q4_1": "Q4_1",
               "mxfp4": "MXFP4"}

#: how far above a reference model's MA on a text the text may stay and still count as forgotten
#: (and how far below it before it counts as over-forgotten)
TOLERANCE = 0.05

#: the reference texts that set eq. 17's thresholds in `localize` (the first N)
REFERENCE_LIMIT = 200

#: the seeds every command takes: what torch's generators take
SEED_RANGE = (0, 2**64 - 1)

#: the most neighbours `neumuter neighbors` writes per record
MAX_NEIGHBORS = 1000


def check_seed(seed) -> None:
    """Refuse a seed torch's generators cannot take (a SettingError naming ``seed``)."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
        raise SettingError("seed", f"must be a whole number from {low} to {high}, not {seed!r}")


@dataclass
class LoadOptions:
    """How a model is loaded: the keywords of ``models.load_model`` (the CLI's model options)."""

    device: str = "auto"             # auto | cpu | cuda | mps
    dtype: str = "auto"              # auto | float32 | bfloat16 | float16
    device_map: str | None = None    # "auto": spread over the GPUs (accelerate)
    max_memory: dict | None = None   # with device_map: the most each device may hold
    trust_remote_code: bool = False


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
    complete: bool = True            # rollback: when training stalls or ends first, revert the most-changed open neurons
    patience: int = 3                # rollback with complete: checks without progress before training counts as stalled
    method: str = "gates"            # gates: train Hard-Concrete gates | attribution: per-text rankings (attribution.py)
    max_per_text: int = 460          # attribution: the longest prefix of a text's ranking that is tried
    contrast: float = 0.0            # attribution: weight of the neighbours' attribution subtracted
    score: str = "specific-smoothed"  # attribution: specific-smoothed | specific | gradient | both (attribution.SCORES)
    shrink_rounds: int = 0           # attribution: rounds of cutting each prefix to what it needs beside the others


#: `localize --base`'s own defaults, where they differ from LocalizeConfig's. Measured on the
#: SmolLM2 fixture (docs/results.md): with the scaling defaults (λ 3, η 0.1) three epochs left
#: the forget texts at mean MA 0.712 (8,388 neurons selected); with λ 0.3 and η 0, at 0.605
#: (11,757). Reverting a neuron costs little, so the KL and L0 terms, which hold neurons at the
#: fine-tune, give way; training then hands over to completion after 5 epochs.
ROLLBACK_DEFAULTS = {"kl_weight": 0.3, "l0_weight": 0.0, "epochs": 5}


@dataclass
class StopRule:
    """When and how far `localize` forgets. All None: it trains every epoch with no check.

    ``reference_model``: a model that never saw the texts (loaded with ``load``, as the model
    itself was), the per-text stop at its MA + ``tolerance``; ``reference_texts`` (the first
    ``reference_limit``) / ``stop_ma`` / ``stop_el``: eq. 17's generic thresholds;
    ``target_ma``: the hinge's own target, overriding the default (each text's reference MA, or
    half the eq. 17 threshold)."""

    reference_model: str | None = None
    tolerance: float = TOLERANCE
    reference_texts: Sequence[str] | None = None
    reference_limit: int = REFERENCE_LIMIT
    stop_ma: float | None = None
    stop_el: float | None = None
    target_ma: float | None = None
    load: LoadOptions = field(default_factory=LoadOptions)
    trust_remote_code_reference: bool = False    # the reference model's own code may run (never the model's flag)

    @property
    def reference_load(self) -> LoadOptions:
        """How the reference model is loaded: as the model, but trusted only by its own flag."""
        return replace(self.load, trust_remote_code=self.trust_remote_code_reference)


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


@dataclass
class MeasureConfig:
    """Everything one ``measure`` run needs (the command's options). Paths are read before any
    model loads, so a bad file fails in a second, not after a model load.

    ``input_path``: the records (``-`` = stdin; None = no records, perplexity alone).
    Verdicts come from at most one of: ``reference_path`` (texts the model never saw, eq. 17),
    ``thresholds_path`` (eq. 17 thresholds saved before), ``reference_model`` (a model that never
    saw the records; compared record by record) or ``reference_scores_path`` (that model's
    numbers saved by ``measure RECORDS --model REF``). ``holdout_path``: texts neither model
    trained on, for the membership-inference AUCs (and PrivLeak with a reference).
    ``quantize``: round-trip the model's block weights through this llama.cpp format first
    (``quantize_reference``: the reference model's too). ``check``: the verdicts will be
    checked, so an empty input is refused (there is nothing to judge)."""

    model: str
    input_path: str | None = "-"
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    max_memory: dict | None = None
    trust_remote_code: bool = False
    trust_remote_code_reference: bool = False    # the reference model's own code (never the model's flag)
    max_length: int | None = 200
    el_ns: tuple[int, ...] = (10,)
    batch_size: int = 64
    reference_path: str | None = None
    thresholds_path: str | None = None
    reference_model: str | None = None
    reference_scores_path: str | None = None
    tolerance: float = TOLERANCE
    holdout_path: str | None = None
    quantize: str | None = None
    quantize_reference: bool = False
    ppl_path: str | None = None
    ppl_window: int | None = None
    ppl_stride: int | None = None
    generations: int = 0
    prefix_tokens: int = 100
    new_tokens: int = 100
    check: bool = False

    @property
    def load(self) -> LoadOptions:
        """How the model is loaded."""
        return LoadOptions(self.device, self.dtype, self.device_map, self.max_memory, self.trust_remote_code)

    @property
    def reference_load(self) -> LoadOptions:
        """How the reference model is loaded: as the model, its code trusted only by its own flag."""
        return replace(self.load, trust_remote_code=self.trust_remote_code_reference)

    def validate(self) -> None:
        """Refuse options that contradict each other (one clear line each)."""
        if self.reference_path and self.thresholds_path:
            raise ConflictingSettings("give {reference_path} or {thresholds_path}, not both")
        if self.reference_model and self.reference_scores_path:
            raise ConflictingSettings("give {reference_model} or {reference_scores_path}, not both")
        if (self.reference_model or self.reference_scores_path) and (self.reference_path or self.thresholds_path):
            raise ConflictingSettings("give {reference_model}/{reference_scores_path} (each record against a model "
                                      "that never saw it) or {reference_path}/{thresholds_path} (eq. 17), not both")
        if self.quantize_reference and not (self.quantize and self.reference_model):
            raise ConflictingSettings("{quantize_reference} needs {quantize} and {reference_model}")
        if self.trust_remote_code_reference and not self.reference_model:
            raise ConflictingSettings("{trust_remote_code_reference} needs {reference_model}")
        if not 0 <= self.tolerance <= 1:     # worded as the CLI's: the library's callers test this message
            raise NeumuterError("--tolerance must be between 0 and 1")


__all__ = ["ROLLBACK_DEFAULTS", "FORGET_TERMS", "LOCALIZE_METHODS", "ATTRIBUTION_SCORES", "OPTIMIZERS", "QUANT_TYPES", "TOLERANCE",
           "REFERENCE_LIMIT", "SEED_RANGE", "MAX_NEIGHBORS", "check_seed", "LoadOptions", "LocalizeConfig", "StopRule",
           "NeighborsConfig", "RelearnConfig", "MeasureConfig"]

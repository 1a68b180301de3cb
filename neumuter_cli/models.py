"""Load a causal LM, find its FFN neurons, gate them with hooks, fold scales into the weights.

The "neurons" of a block are the inputs of its FFN down-projection (W2 / c_proj / down_proj /
dense_4h_to_h / fc2 / fc_out). They are found by structure, not by model name: inside each
decoder block, the linear map from a width larger than the hidden size back to the hidden size.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import NeumuterError, distributed, offload
from .errors import ConflictingSettings, DeviceUnavailable, NonFiniteLoss, SettingError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION_WORDS = ("attn", "attention")


@dataclass
class FFNLayer:
    """One decoder block's FFN down-projection: the place where its neurons are gated."""

    index: int            # block number
    path: str             # module path of the down-projection
    module: nn.Module
    neurons: int          # input width of the down-projection
    conv1d: bool          # GPT-2 Conv1D stores weight as (in, out); nn.Linear as (out, in)

    @property
    def orientation(self) -> str:
        return "Conv1D (in, out)" if self.conv1d else "Linear (out, in)"


# ---------------------------------------------------------------- loading

def resolve_device(device: str) -> str:
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("cuda", "no CUDA device is available")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceUnavailable("mps", "MPS is not available")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype | str:
    if dtype == "auto":
        # float32 on CPU (exact metrics, no slow half kernels); the checkpoint's own dtype elsewhere
        return torch.float32 if device == "cpu" else "auto"
    if dtype not in DTYPES:
        raise NeumuterError(f"unknown dtype {dtype!r} (choose auto, float32, bfloat16, float16)")
    return DTYPES[dtype]


def split_gguf(model: str) -> tuple[str, str | None]:
    """``dir/file.gguf`` → (``dir``, ``file.gguf``); anything else → (model, None)."""
    if model.lower().endswith(".gguf"):
        if not os.path.isfile(model):
            raise NeumuterError(f"GGUF file not found: {model}")
        return os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    return model, None


def check_model_path(model: str) -> None:
    """A local path must exist and hold a config.json; a hub name (``org/name``) is left to
    transformers."""
    if os.path.exists(model):
        if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
            raise NeumuterError(f"{model}: not a model directory (no config.json)")
        if os.path.isdir(model):
            from .records import MAX_SMALL_FILE, size_text

            config = os.path.join(model, "config.json")
            if os.path.getsize(config) > MAX_SMALL_FILE:     # transformers would read it whole
                raise NeumuterError(f"{config}: larger than {size_text(MAX_SMALL_FILE)}B: not a model's config")
        if os.path.isfile(model):
            raise NeumuterError(f"{model}: a file, not a model directory or .gguf file")
        return
    parts = model.split("/")
    hub_name = len(parts) <= 2 and all(p and not p.startswith((".", "~")) for p in parts)
    if not hub_name:
        raise NeumuterError(f"model not found: {model}")


def own_code(model: str) -> str | None:
    """The file of a local checkpoint folder that names code of its own which transformers would
    have to run to load it: ``config.json`` or ``tokenizer_config.json`` with an ``auto_map`` for
    a model type or tokenizer class transformers does not have. None for any other checkpoint
    (transformers loads one of its own types with its own classes, its code unread)."""
    import json

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .records import read_small_file

    source, _ = split_gguf(model)
    if not os.path.isdir(source):
        return None
    for name, kind in (("config.json", "model_type"), ("tokenizer_config.json", "tokenizer_class")):
        try:
            data = json.loads(read_small_file(os.path.join(source, name)) or b"null")
        except (OSError, ValueError, RecursionError, NeumuterError):
            continue
        if not isinstance(data, dict) or not data.get("auto_map"):
            continue
        value = data.get(kind)
        known = isinstance(value, str) and (value in CONFIG_MAPPING if kind == "model_type"
                                            else hasattr(transformers, value))
        if not known:
            return name
    return None


def refuse_untrusted_code(model: str, trusted: bool, label: str, setting: str = "trust_remote_code") -> None:
    """Trust is per model: refuse ``model`` (named ``label`` in the message) when loading it would
    run code of its own and ``setting``, the flag that trusts this very model, is not given.
    The model's --trust-remote-code never covers a reference model or a masked LM."""
    found = None if trusted else own_code(model)
    if found is not None:
        others = "{trust_remote_code} is for {model} only; " if setting == "trust_remote_code_reference" else ""
        raise ConflictingSettings("{label} runs code of its own to load (its {found} names it in \"auto_map\"): "
                                  + others + "give {" + setting + "} to let it run", label=label, found=found)


def load_tokenizer(model: str, trust_remote_code: bool = False):
    """The tokenizer of ``model``; refused when it cannot be loaded, or when it turns text into
    no tokens at all (a model folder without its tokenizer files: transformers then builds an
    empty tokenizer, and every text would seem to have 0 tokens)."""
    from transformers import AutoTokenizer

    source, gguf_file = split_gguf(model)
    if gguf_file is None:
        check_model_path(source)
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    _check_config(model, source, kwargs)     # a broken config.json is the model's fault, not the tokenizer's
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:   # OSError, ValueError, and whatever a broken tokenizer file raises
        raise NeumuterError(f"cannot load the tokenizer of {model}: {first_line(exc)}") from None
    try:
        probe = tokenizer(TOKENIZER_PROBE, add_special_tokens=False, verbose=False)["input_ids"]
    except Exception as exc:
        raise NeumuterError(f"cannot load the tokenizer of {model}: it cannot encode text ({first_line(exc)})") from None
    if not probe:
        raise NeumuterError(f"cannot load the tokenizer of {model}: it turns text into no tokens at all "
                            "(are its tokenizer files missing from the folder?)")
    return tokenizer


def _check_config(model: str, source: str, kwargs: dict) -> None:
    """Load the config alone: a broken one, or an encoder-decoder model, is refused before
    any tokenizer or weight loads."""
    from transformers import AutoConfig

    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise NeumuterError(f"cannot load {model}: {first_line(exc)}") from None
    if getattr(config, "is_encoder_decoder", False):
        kind = getattr(config, "model_type", "?")
        architectures = getattr(config, "architectures", None) or []
        named = f" ({architectures[0]})" if architectures and isinstance(architectures[0], str) else ""
        raise NeumuterError(f"model type {kind!r}{named} is an encoder-decoder model, not a causal decoder LM: "
                            "neumuter needs a decoder-only causal LM")


#: a text every real tokenizer turns into some tokens
TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog. 0123456789"


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings off while it loads: its load report (missing, unexpected or
    mismatched weights) is turned into one line of our own, or a refusal."""
    from transformers.utils import logging as hf_logging

    try:        # huggingface_hub logs its retries of a hub name that cannot be reached
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        hub_logging = None
    level = hf_logging.get_verbosity()
    hub_level = hub_logging.get_verbosity() if hub_logging else None
    hf_logging.set_verbosity_error()
    if hub_logging:
        hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if hub_logging:
            hub_logging.set_verbosity(hub_level)


def tokenizer_size(tokenizer) -> int:
    """One more than the largest token id ``tokenizer`` can produce (added tokens included)."""
    vocab = tokenizer.get_vocab()
    return max(max(vocab.values(), default=-1) + 1, len(tokenizer))


def check_vocabulary(name: str, embedding_rows: int, tokenizer, what: str = "embedding") -> None:
    """Refuse a model whose embedding (or LM head) has fewer rows than its tokenizer has token
    ids: a text holding such a token would index past the end of the weights."""
    size = tokenizer_size(tokenizer)
    if embedding_rows < size:
        raise NeumuterError(f"{name}: its tokenizer has token ids up to {size - 1}, but its {what} has only "
                            f"{embedding_rows} rows: the tokenizer does not belong to these weights")


def checkpoint_vocab_size(model: str, trust_remote_code: bool = False) -> int | None:
    """The vocabulary size a checkpoint's config declares (its embedding rows), without loading
    any weight; None when the config cannot say."""
    from transformers import AutoConfig

    source, gguf_file = split_gguf(model)
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "vocab_size", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


# safetensors dtypes that hold no floating-point value
_NON_FLOAT = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def _weight_files(folder: str) -> list[str]:
    """The safetensors files of a checkpoint folder: those its index names, else every
    ``*.safetensors`` in it."""
    import json

    from .records import read_small_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            names = sorted(set(json.loads(read_small_file(index) or b"")["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise NeumuterError(f"{index}: not a readable safetensors index") from None
        return [os.path.join(folder, name) for name in names]
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".safetensors"))


#: the longest header safetensors itself reads (its MAX_HEADER_SIZE)
MAX_SAFETENSORS_HEADER = 100_000_000


def read_safetensors_header(path: str) -> dict[str, dict]:
    """The tensors a safetensors file declares, ``{name: {"dtype", "shape", "data_offsets"}}``,
    checked against the file's size: a truncated or corrupted file is refused with one line
    naming it (safetensors itself raises errors that name no file)."""
    import json

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or 8 + length > size:
                raise NeumuterError(f"{path}: not a complete safetensors file (its header says {max(length, 0)} "
                                    f"bytes of metadata, the file has {size} bytes)")
            if length > MAX_SAFETENSORS_HEADER:
                raise NeumuterError(f"{path}: not a safetensors file (its header says {length:,} bytes of metadata, "
                                    f"safetensors reads at most {MAX_SAFETENSORS_HEADER:,})")
            header = json.loads(handle.read(length).decode("utf-8"))
    except OSError as exc:
        raise NeumuterError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise NeumuterError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise NeumuterError(f"{path}: not a safetensors file (its header is not a JSON object)")
    tensors, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
            elements = 1
            for dim in shape:
                elements *= int(dim)
            ok = (dtype in _DTYPE_BYTES and 0 <= int(begin) <= int(stop)
                  and int(stop) - int(begin) == elements * _DTYPE_BYTES[dtype])
        except (TypeError, KeyError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise NeumuterError(f"{path}: tensor {name!r} is not described correctly in the header")
        tensors[name] = info
        end = max(end, int(stop))
    if 8 + length + end > size:
        raise NeumuterError(f"{path}: truncated (its tensors need {8 + length + end} bytes, the file has {size})")
    return tensors


def _stored_dtypes(folder: str) -> dict[str, tuple[str, str]]:
    """``{tensor name: (safetensors dtype, file)}`` of every tensor of a local checkpoint."""
    stored = {}
    for path in _weight_files(folder):
        for name, info in read_safetensors_header(path).items():
            stored[name] = (info["dtype"], os.path.basename(path))
    return stored


def _check_loaded_whole(model: str, lm: nn.Module, info: dict, stored: dict[str, tuple[str, str]]) -> None:
    """Refuse a load that transformers reports as incomplete (a weight missing from the
    checkpoint, a tensor the model has no place for, a shape that does not match the config),
    or a floating-point weight stored as integers (transformers casts it without a word)."""
    def listed(keys):
        keys = sorted(keys)
        return keys[0] + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")

    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: str(item[0]))
    if missing:
        raise NeumuterError(f"cannot load {model}: weight {listed(missing)} is missing from the checkpoint "
                            "(transformers would fill it with random values)")
    if mismatched:
        key, stored_shape, model_shape = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise NeumuterError(f"cannot load {model}: weight {key} has shape {list(stored_shape)} in the checkpoint, "
                            f"but its config.json makes it {list(model_shape)}{more}: the config does not "
                            "describe these weights")
    if unexpected:
        raise NeumuterError(f"cannot load {model}: the checkpoint holds {listed(unexpected)}, which this model "
                            f"({model_type(lm)}) has no place for: the config does not describe these weights")
    errors = info.get("error_msgs") or ()
    if errors:
        raise NeumuterError(f"cannot load {model}: {first_line(RuntimeError(errors[0]))}")
    floating = {name for name, tensor in lm.state_dict().items() if tensor.is_floating_point()}
    for name, (dtype, file) in sorted(stored.items()):
        if dtype in _NON_FLOAT and any(n == name or n.endswith("." + name) or name.endswith("." + n)
                                       for n in floating):
            raise NeumuterError(f"cannot load {model}: {file} stores the weight {name} as {dtype}, but it is a "
                                "floating-point weight (transformers would cast the integers without a word)")


def load_model(
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    max_memory: dict | None = None,
):
    """Load a causal LM (local dir, hub name, or ``.gguf`` file) in eval mode with frozen weights.

    Returns (model, tokenizer). ``device_map="auto"`` spreads a large model over the GPUs
    (accelerate); then ``device`` is ignored. ``max_memory`` (with ``device_map``): the most
    each device may hold, e.g. ``{0: 20 * 2**30, "cpu": 64 * 2**30}``; the rest is offloaded
    to the CPU or to disk (see offload.py).

    The model is loaded whole or refused: a weight missing from the checkpoint, one it holds
    that the model has no place for, a shape the config does not give, a floating-point weight
    stored as integers, a truncated file, a tokenizer that is missing or has more token ids
    than the embedding has rows: each is one NeumuterError (transformers itself would fill a
    missing weight with random values and only print a report)."""
    from transformers import AutoModelForCausalLM

    if max_memory is not None and device_map is None:
        raise SettingError("max_memory", 'needs a device map (device_map="auto")')
    if device_map is not None and distributed.world().size > 1:
        raise SettingError("device_map", "spreads one copy of the model over every GPU, but each of the "
                                         f"{distributed.world().size} processes of the launcher holds its own copy: "
                                         "run one process, or give each process its own GPU")
    source, gguf_file = split_gguf(model)
    if gguf_file is None:
        check_model_path(source)
    refuse_untrusted_code(model, trust_remote_code, model)
    target = distributed.place(resolve_device(device)) if device_map is None else None
    tokenizer = load_tokenizer(model, trust_remote_code)       # cheap: a missing tokenizer fails first
    stored = _stored_dtypes(source) if gguf_file is None and os.path.isdir(source) else {}
    kwargs = {"trust_remote_code": trust_remote_code, "dtype": resolve_dtype(dtype, target or "cuda"),
              "output_loading_info": True, "ignore_mismatched_sizes": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        if kwargs["dtype"] == "auto":
            kwargs["dtype"] = torch.float32
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = dict(max_memory)
    try:
        with _quiet_transformers():
            lm, info = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except NeumuterError:
        raise
    except Exception as exc:   # a truncated or corrupted file, a config that does not fit, a missing package
        raise NeumuterError(f"cannot load {model}: {first_line(exc)}") from None
    _check_loaded_whole(model, lm, info, stored)
    check_vocabulary(model, lm.get_input_embeddings().num_embeddings, tokenizer)
    head = lm.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        check_vocabulary(model, head.weight.shape[0], tokenizer, "LM head")
    if device_map is None:
        lm.to(target)
    lm.eval()
    for param in lm.parameters():
        param.requires_grad_(False)
    check_causal_lm(lm)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    lm.neumuter_source = model
    return lm, tokenizer


@torch.no_grad()
def check_causal_lm(model: nn.Module) -> None:
    """Refuse a model that is not a causal decoder LM, with the model type named.

    Names do not settle it: ``AutoModelForCausalLM`` loads a BERT masked-LM checkpoint as
    ``BertLMHeadModel``, a "causal LM" class that attends both ways unless its config says
    ``is_decoder``. So the rule is what the metrics rely on: an encoder-decoder config is
    refused, and the prediction at each position must not depend on later tokens: two 8-token
    inputs that differ only in their last 4 tokens must give the same logits on the first 4,
    up to rounding (one forward pass; a causal model gives them bit for bit)."""
    config = getattr(model, "config", None)
    kind = model_type(model)
    if getattr(config, "is_encoder_decoder", False):
        raise NeumuterError(f"model type {kind!r} ({type(model).__name__}) is an encoder-decoder model, "
                            "not a causal decoder LM: neumuter needs a decoder-only causal LM")
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < 2:
        return
    ids = (torch.arange(8) * 7 + 3) % vocab
    other = ids.clone()
    other[4:] = (ids[4:] + 1) % vocab
    batch = torch.stack([ids, other]).to(input_device(model))
    try:
        logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.float()[:, :4]
    except Exception as exc:       # a model transformers loads but cannot run (with its KV cache, as EL does)
        raise NeumuterError(f"model type {kind!r} ({type(model).__name__}) cannot run as a causal LM: its forward "
                            f"pass fails ({first_line(exc)})") from None
    if not torch.isfinite(logits).all():
        return      # broken weights say nothing about attention; the stage that uses them reports it
    change = (logits[0] - logits[1]).abs().max().item()
    compute = next(model.parameters()).dtype
    rounding = 16 * torch.finfo(compute if compute.is_floating_point else torch.float32).eps
    if not change <= rounding * max(1.0, logits.abs().max().item()):
        raise NeumuterError(
            f"model type {kind!r} ({type(model).__name__}) is not a causal decoder LM: its prediction at a "
            "position changes with later tokens (it attends both ways, like a masked LM); neumuter needs "
            "a decoder-only causal LM")


@contextlib.contextmanager
def float32_steps(where: str):
    """An optimiser step whose size overflows float32 (a learning rate near the largest float32:
    Adam's first step is ten times it) is a NonFiniteLoss, as a loss that is not finite is,
    not torch's RuntimeError."""
    try:
        yield
    except RuntimeError as exc:
        if "without overflow" not in str(exc):
            raise
        raise NonFiniteLoss(f"{where}: the update overflows the float32 weights (a step larger than "
                            f"{torch.finfo(torch.float32).max:.6g})") from None


def first_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line: its first line, and the next one when the first only
    announces it (ends with a colon), at most 300 characters."""
    lines = [line.strip() for line in (str(exc).strip() or type(exc).__name__).splitlines() if line.strip()]
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return text[:300]


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its embeddings' device (where accelerate runs them when
    they are offloaded)."""
    embeddings = model.get_input_embeddings()
    if offload.is_offloaded(embeddings.weight):
        return offload.execution_device(embeddings) or torch.device("cpu")
    return embeddings.weight.device


# ---------------------------------------------------------------- locating the FFN neurons

def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, is_conv1d) for nn.Linear-like and GPT-2 Conv1D modules."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return module.nx, module.nf, True
    weight = getattr(module, "weight", None)
    if (hasattr(module, "in_features") and hasattr(module, "out_features")
            and isinstance(weight, torch.Tensor) and weight.dim() == 2):
        return module.in_features, module.out_features, False  # e.g. quantised Linear subclasses
    return None


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList of same-class modules: the stack of decoder blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(block) for block in module}) != 1:
                continue
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise NeumuterError(f"cannot find the decoder blocks of model type {model_type(model)!r}")
    return best


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


# config keys that count experts, across the mixture-of-experts models transformers ships
MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                   "num_experts_per_tok", "moe_topk")
MOE_NAMES = re.compile(r"expert|moe|router", re.IGNORECASE)


def _experts_in_config(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (config, text_config):
        for key in MOE_CONFIG_KEYS:
            value = getattr(source, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                return f"config {key} = {value}"
    return None


def _experts_in_block(block: nn.Module) -> str | None:
    for name, module in block.named_modules():
        last = name.rsplit(".", 1)[-1]
        if MOE_NAMES.search(last) or (name and MOE_NAMES.search(type(module).__name__)):
            return f"{name} ({type(module).__name__})"
    return None


def find_ffn_layers(model: nn.Module) -> list[FFNLayer]:
    """Every decoder block's FFN down-projection, found by shape.

    In each block: the linear maps whose output is the hidden size and whose input is wider
    (the FFN's intermediate width). Attention output projections are excluded by name when a
    block has both; a block with no candidate, or several equally plausible ones, is refused
    with the model type named. A mixture-of-experts FFN is refused too (experts, a router, or
    a config that counts experts), even when a shared expert looks like one dense FFN: gating
    it alone would leave the routed experts untouched."""
    hidden = model.get_input_embeddings().embedding_dim
    blocks_path, blocks = decoder_blocks(model)
    kind = model_type(model)
    experts = _experts_in_config(model)
    if experts:
        raise NeumuterError(f"model type {kind!r} is not supported: its FFNs are mixtures of experts ({experts}); "
                            "neumuter gates the neurons of one dense FFN per block")
    layers = []
    for index, block in enumerate(blocks):
        experts = _experts_in_block(block)
        if experts:
            raise NeumuterError(f"model type {kind!r} is not supported: block {index} ({blocks_path}.{index}) has a "
                                f"mixture-of-experts FFN ({experts}); neumuter gates the neurons of one dense FFN "
                                "per block")
        candidates = []
        for name, module in block.named_modules():
            dims = linear_dims(module)
            if dims and dims[1] == hidden and dims[0] > hidden:
                candidates.append((name, module, dims))
        if len(candidates) > 1:
            candidates = [c for c in candidates if not any(w in c[0].lower() for w in ATTENTION_WORDS)]
        if len(candidates) != 1:
            what = "no" if not candidates else f"{len(candidates)} ambiguous"
            raise NeumuterError(
                f"model type {kind!r} is not supported: {what} FFN down-projection candidates in block "
                f"{index} ({blocks_path}.{index}); neumuter needs one linear map from the FFN width "
                f"back to the hidden size {hidden} per block")
        name, module, (width, _, conv1d) = candidates[0]
        layers.append(FFNLayer(index, f"{blocks_path}.{index}.{name}", module, width, conv1d))
    return layers


def parse_layers(spec: str | None, count: int) -> list[int]:
    """``"10-16,21"`` → [10, …, 16, 21]; None or ``"all"`` → every block."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(range(count))
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                chosen.update(range(lo, hi + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise SettingError("layers", f"{spec!r} is not a list of block numbers and ranges like 10-16,21") from None
    bad = sorted(i for i in chosen if not 0 <= i < count)
    if bad:
        raise SettingError("layers", f"{spec!r}: block {bad[0]} does not exist (the model has blocks 0-{count - 1})")
    return sorted(chosen)


def block_spans(blocks: Sequence[int]) -> str:
    """[3, 4, 5, 9] → "3-5,9": the inverse of :func:`parse_layers` for sorted blocks."""
    parts, start = [], None
    for k, b in enumerate(blocks):
        if start is None:
            start = b
        if k + 1 == len(blocks) or blocks[k + 1] != b + 1:
            parts.append(str(start) if start == b else f"{start}-{b}")
            start = None
    return ",".join(parts)


# ---------------------------------------------------------------- gating and folding

@contextlib.contextmanager
def gated(layers: Sequence[FFNLayer], gate_fn: Callable[[int], torch.Tensor]) -> Iterator[None]:
    """Multiply each layer's down-projection input by ``gate_fn(i)`` (i = position in
    ``layers``) during the block; the hooks are removed afterwards, whatever happens."""
    handles = []
    try:
        for position, layer in enumerate(layers):
            def hook(module, args, position=position):
                gate = gate_fn(position)
                return (args[0] * gate.to(dtype=args[0].dtype, device=args[0].device),) + tuple(args[1:])
            handles.append(layer.module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def scaled(model: nn.Module, scales: dict[int, torch.Tensor], layers: Sequence[FFNLayer] | None = None
           ) -> Iterator[None]:
    """The model with each named block's FFN neurons multiplied by their scales (``{block: one
    scale per neuron}``, as a scales file holds them), by hooks while inside and none after:
    the numbers :func:`fold_scales` gives, without touching a weight. ``layers``: the model's
    :func:`find_ffn_layers`, when already found."""
    by_block = {layer.index: layer for layer in (find_ffn_layers(model) if layers is None else layers)}
    blocks = sorted(scales)
    device = input_device(model)
    factors = [scales[b].to(device) for b in blocks]
    with gated([by_block[b] for b in blocks], lambda i: factors[i]):
        yield


@torch.no_grad()
def fold_scales(layers: Sequence[FFNLayer], scales: Sequence[torch.Tensor]) -> None:
    """Fold per-neuron scales into the down-projection weights in place (column i of an
    nn.Linear weight, row i of a Conv1D weight). The bias is not touched: it does not depend
    on the neuron inputs."""
    for layer, scale in zip(layers, scales):
        weight = offload.read(layer.module, "weight")
        if scale.shape != (layer.neurons,):
            raise NeumuterError(f"{layer.path}: {scale.numel()} scales for {layer.neurons} neurons")
        compute = torch.promote_types(weight.dtype, torch.float32)  # float64 weights stay float64
        factor = scale.to(device=weight.device, dtype=compute)
        folded = (weight.to(compute) * (factor[:, None] if layer.conv1d else factor[None, :])).to(weight.dtype)
        if offload.is_offloaded(layer.module.weight):
            offload.write(layer.module, "weight", folded)
        else:
            weight.copy_(folded)


def neuron_columns(layer: FFNLayer) -> torch.Tensor:
    """The down-projection weight as (out, neurons), whatever its storage orientation."""
    weight = layer.module.weight
    return weight.t() if layer.conv1d else weight


FINGERPRINT_CHUNK = 1 << 24   # elements hashed per step: bounds the memory of a conversion (64 MB)


def fingerprint(model: nn.Module) -> str:
    """A hash of every tensor the model's output depends on: its whole state dict (weights and
    persistent buffers), streamed tensor by tensor, chunk by chunk, into SHA-256.

    Each tensor contributes its name, shape and dtype class, then the bytes of its values.
    Floating-point tensors of 32 bits or fewer are hashed as float32 values (bfloat16 and
    float16 convert exactly), so the same checkpoint loaded in bfloat16 (apply keeps the stored
    dtype) or float32 (the CPU default) has the same fingerprint, while a change of any single
    element of any tensor changes it. A tensor shared under two names (tied embeddings) is
    hashed once; the second name is recorded as an alias.

    Cost: one pass of SHA-256 (with the CPU's SHA instructions) over 4 bytes per parameter.
    Measured on a shared 2-core machine: 500 MB of float32 weights (125M parameters) in
    0.25-0.5 s, i.e. 1-2 GB/s; bfloat16 weights, widened on the way, cost about the same per
    parameter. A 7B model (28 GB as float32 values) therefore takes 15-30 s. Weights on a GPU
    are copied to the CPU one chunk at a time."""
    return fingerprints(model)["exact"]


#: the dtypes a copy of a model is commonly saved in: a copy rounded to one of them is the same model
ROUNDINGS = (torch.bfloat16, torch.float16)


def fingerprints(model: nn.Module, rounded: bool = False) -> dict[str, str]:
    """``{"exact": fingerprint(model)}``, and with ``rounded`` also ``{"bfloat16": ...,
    "float16": ...}``: the fingerprint of the model with every floating-point weight rounded to
    that dtype first, in the same pass. Two models whose rounded fingerprints agree are one
    model saved in two precisions (a float32 checkpoint and its bfloat16 copy): the reference
    of a verdict must not be such a copy."""
    digests = {"exact": hashlib.sha256()}
    if rounded:
        digests.update({str(dtype).replace("torch.", ""): hashlib.sha256() for dtype in ROUNDINGS})
    seen: dict[tuple, str] = {}
    widened = None   # reused buffer for bfloat16 → float32 bits
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        source = None
        if offload.is_offloaded(tensor):        # kept by accelerate outside the model (--max-memory)
            tensor, source = offload.stored(model, name)
        as_float32 = tensor.is_floating_point() and tensor.element_size() <= 4
        dtype = "float32" if as_float32 else str(tensor.dtype).replace("torch.", "")
        for digest in digests.values():
            digest.update(f"{name}\0{tuple(tensor.shape)}\0{dtype}\0".encode())
        key = source or (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and key in seen:
            for digest in digests.values():
                digest.update(f"={seen[key]}\0".encode())
            continue
        seen[key] = name
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), FINGERPRINT_CHUNK):
            piece = flat[start:start + FINGERPRINT_CHUNK].to("cpu").contiguous()
            if rounded:
                for dtype in ROUNDINGS:
                    values = piece.to(dtype).to(torch.float32) if tensor.is_floating_point() else piece
                    digests[str(dtype).replace("torch.", "")].update(values.view(torch.uint8).numpy())
            if piece.dtype == torch.bfloat16 and sys.byteorder == "little":
                # a bfloat16 is the high half of a float32: interleave with zero low halves
                # (exact, and several times faster than a float conversion)
                if widened is None:
                    widened = np.zeros(2 * FINGERPRINT_CHUNK, dtype=np.uint16)
                wide = widened[: 2 * piece.numel()]
                wide[1::2] = piece.view(torch.int16).numpy().view(np.uint16)
                digests["exact"].update(wide)
                continue
            if as_float32 and piece.dtype != torch.float32:
                piece = piece.to(torch.float32)
            digests["exact"].update(piece.view(torch.uint8).numpy())
    return {kind: digest.hexdigest()[:32] for kind, digest in digests.items()}


def lineage(model: str) -> dict[str, str]:
    """The fingerprints a neumuter checkpoint folder says it was made from: ``{fingerprint:
    stage}`` from its neumuter.json (``source_fingerprint``) and every record of its history
    (what `apply`, `quantize` and `relearn` wrote); empty for any other model."""
    import json

    from .records import read_small_file

    path = os.path.join(model, "neumuter.json")
    try:
        record = json.loads(read_small_file(path) or b"{}")
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(record, dict):
        return {}
    found: dict[str, str] = {}
    history = record.get("history") if isinstance(record.get("history"), list) else []
    for entry in [record, *history]:
        if not isinstance(entry, dict):
            continue
        stage = entry.get("stage") if isinstance(entry.get("stage"), str) else "apply"
        for key in ("source_fingerprint", "fingerprint"):
            value = entry.get(key)
            if isinstance(value, str) and not (entry is record and key == "fingerprint"):
                found.setdefault(value, stage)
    return found


def describe(model: nn.Module, layers: Sequence[FFNLayer]) -> dict:
    """Provenance shared by every artifact: where the model came from and what it is."""
    return {
        "model": getattr(model, "neumuter_source", getattr(getattr(model, "config", None), "_name_or_path", "")),
        "architecture": model_type(model),
        "fingerprint": fingerprint(model),
        "modules": [layer.path for layer in layers],
        "neurons": [layer.neurons for layer in layers],
    }


def check_same_tokenizer(tokenizer, other, name: str, other_name: str, texts: Sequence[str] = ()) -> None:
    """Refuse to compare two models whose tokenizers differ: the same text must give the same
    token ids under both, or per-token numbers (MA, loss) mean different things."""
    same = tokenizer.get_vocab() == other.get_vocab()
    if same:
        for text in texts:
            if tokenizer(text, verbose=False)["input_ids"] != other(text, verbose=False)["input_ids"]:
                same = False
                break
    if not same:
        raise NeumuterError(f"{other_name} does not share the tokenizer of {name}: "
                            "a reference model must tokenize texts exactly as the model does")

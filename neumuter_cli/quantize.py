"""Round-trip a model's block weights through a llama.cpp quantisation format, in place.

Is a forgotten text still forgotten once the model is quantised, as most people will run it?
``quantize_model`` answers the weight side of that question without llama.cpp: every linear
weight inside the decoder blocks (attention and FFN projections) is quantised to a GGML block
format and dequantised back to its own dtype with the ``gguf`` package's reference
implementation (``gguf.quants``), so the model computes with exactly the values a llama.cpp
file of that type holds. Embeddings, the LM head and norms stay as they are (llama.cpp keeps
norms in float and quantises embeddings/head with their own, file-level choices).

GGML blocks run along a row of the weight as llama.cpp stores it: ``(out, in)``, one block of
32 consecutive input weights of one output unit. GPT-2's Conv1D stores ``(in, out)``; it is
transposed first, as llama.cpp's converter does. A weight whose row length is not a multiple
of the block size cannot be stored in the format; it is left as it is and listed.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict
from typing import Callable

import torch

from . import NeumuterError, offload
from .config import QUANT_TYPES, LoadOptions  # the formats offered, defined torch-free for the CLI
from .errors import escape


def gguf_type(qtype: str):
    """The gguf quantisation type for ``qtype`` and its block size; clear errors otherwise."""
    name = QUANT_TYPES.get(qtype.lower())
    if name is None:
        raise NeumuterError(f"unknown quantisation type {qtype!r} (choose {', '.join(QUANT_TYPES)})")
    try:
        import gguf
        from gguf import quants
    except ImportError:
        raise NeumuterError("quantising needs the gguf package: pip install gguf") from None
    member = getattr(gguf.GGMLQuantizationType, name, None)
    if member is None or member not in gguf.GGML_QUANT_SIZES:
        raise NeumuterError(f"the installed gguf package does not know {qtype} (upgrade it: pip install -U gguf)")
    block = gguf.GGML_QUANT_SIZES[member][0]
    try:
        import numpy as np

        quants.quantize(np.zeros((1, block), dtype=np.float32), member)
    except NotImplementedError:
        raise NeumuterError(f"the installed gguf package cannot quantise {qtype} "
                            "(upgrade it: pip install -U gguf)") from None
    return quants, member, block


def _block_linears(model) -> list[tuple[str, torch.nn.Module, bool]]:
    """(module path, module, is_conv1d) of every 2-D linear map inside the decoder blocks."""
    from .models import decoder_blocks, linear_dims

    blocks_path, blocks = decoder_blocks(model)
    found = []
    for index, block in enumerate(blocks):
        for name, module in block.named_modules():
            dims = linear_dims(module)
            weight = getattr(module, "weight", None)
            if dims and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point():
                found.append((f"{blocks_path}.{index}.{name}", module, dims[2]))
    return found


def name_patterns(names: list[str]) -> list[str]:
    """Module paths with the block number replaced by ``*``, each pattern once, in order:
    ``transformer.h.0.mlp.c_fc``, ``transformer.h.1.mlp.c_fc`` -> ``transformer.h.*.mlp.c_fc``."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(re.sub(r"\.\d+\.", ".*.", name, count=1), None)
    return list(seen)


@torch.no_grad()
def quantize_model(model, qtype: str, progress: Callable[[str], None] | None = None) -> dict:
    """Quantise every linear weight of the decoder blocks to ``qtype`` and back, in place.

    Returns ``{"type", "weights", "elements", "patterns", "skipped", "seconds"}``: the number of
    weights changed and their element count, their module paths with the block number as
    ``*``, and the paths of the weights left as they are (row length not a multiple of the
    format's block size)."""
    import numpy as np

    quants, member, block = gguf_type(qtype)
    start = time.monotonic()
    done, skipped, elements = [], [], 0
    linears = _block_linears(model)
    for k, (path, module, conv1d) in enumerate(linears):
        weight = offload.read(module, "weight")
        rows = weight.t() if conv1d else weight          # (out, in): blocks run along the input
        if rows.shape[1] % block:
            skipped.append(path)
            continue
        array = rows.detach().to("cpu", torch.float32).contiguous().numpy()
        restored = quants.dequantize(quants.quantize(array, member), member)
        restored = torch.from_numpy(np.ascontiguousarray(restored, dtype=np.float32)).reshape(rows.shape)
        if offload.is_offloaded(module.weight):       # kept by accelerate outside the model
            restored = restored.t() if conv1d else restored
            offload.write(module, "weight", restored.to(dtype=weight.dtype).contiguous())
        else:
            rows.copy_(restored.to(device=weight.device, dtype=weight.dtype))
        done.append(path)
        elements += array.size
        if progress and (k + 1) % 16 == 0:
            progress(f"quantize: {k + 1}/{len(linears)} weights")
    if not done:
        raise NeumuterError(f"no block weight could be quantised to {qtype} "
                            f"(row lengths must be multiples of {block})")
    summary = {"type": qtype.lower(), "weights": len(done), "elements": elements,
               "patterns": name_patterns(done), "skipped": skipped,
               "seconds": round(time.monotonic() - start, 3)}
    if progress:
        progress(f"quantized {len(done)} block weights ({elements:,} elements) to {qtype.lower()} and back "
                 f"in {summary['seconds']:.1f}s" + (f"; {len(skipped)} left as they are" if skipped else ""))
    return summary


def quantized_checkpoint_record(model, source: str, summary: dict, source_fingerprint: str | None = None) -> dict:
    """The ``neumuter.json`` of a checkpoint written after :func:`quantize_model`: what was
    routed through which format, from which model (``source_fingerprint``: its fingerprint
    before the round trip, so that a quantised copy is known as the model's copy), and the
    source checkpoint's own records."""
    from . import __version__
    from .artifacts import previous_records
    from .models import fingerprint

    return {"stage": "quantize", "tool_version": __version__, "source_model": source,
            "source_fingerprint": source_fingerprint,
            "quantization": {k: summary[k] for k in ("type", "weights", "elements", "patterns", "skipped")},
            "fingerprint": fingerprint(model), "history": previous_records(source)}


def run_quantize(model: str, qtype: str, output: str, force: bool = False, load: LoadOptions | None = None,
                 progress: Callable[[str], None] | None = None) -> dict:
    """The `quantize` stage from paths: check the output folder, load the model, round-trip its
    block weights through ``qtype`` and save it as a float checkpoint. Returns
    :func:`quantize_model`'s summary."""
    from .artifacts import check_output_dir, save_checkpoint
    from .models import fingerprint, load_model

    check_output_dir(output, force, protected=(model,))
    if progress:
        progress(f"loading {escape(model)}")
    lm, tokenizer = load_model(model, **asdict(load or LoadOptions()))
    source_fingerprint = fingerprint(lm)
    summary = quantize_model(lm, qtype.lower(), progress)
    save_checkpoint(lm, tokenizer, output, quantized_checkpoint_record(lm, model, summary, source_fingerprint), force,
                    protected=(model,))
    return summary


__all__ = ["QUANT_TYPES", "gguf_type", "quantize_model", "name_patterns", "quantized_checkpoint_record", "run_quantize"]

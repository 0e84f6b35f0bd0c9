"""Turn a GGUF causal LM into a plain Hugging Face folder (float32 safetensors + config + tokenizer), once.

``PretrainedCausalLM`` and ``TextDataModule`` read GGUF directly (``gguf_file``), but transformers
dequantises the file on every load (about 20 s for SmolLM2-135M on a CPU) and cannot save such a model
itself; a folder loads in a second and can be exported and judged like any other model.

    python tools/gguf_to_hf.py ~/.cache/dbl-assets/smollm2 SmolLM2-135M-Instruct.Q4_1.gguf ~/.cache/dbl-assets/smollm2-hf

Needs ``pip install gguf``. The weights are the GGUF's dequantised values, so the folder computes the
same logits as the GGUF model (checked below on one sentence, to 1e-5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="the folder holding the .gguf file")
    parser.add_argument("gguf_file", help="the .gguf file's name in that folder")
    parser.add_argument("out", help="the Hugging Face folder to write")
    args = parser.parse_args(argv)
    if not (Path(args.directory).expanduser() / args.gguf_file).is_file():
        sys.exit(f"gguf_to_hf: {Path(args.directory) / args.gguf_file} does not exist "
                 "(../shared/tools/offline_assets.sh fetches SmolLM2's)")
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"gguf_to_hf: {out} exists and is not empty; choose another folder")
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        sys.exit("gguf_to_hf: needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = str(Path(args.directory).expanduser())
    quantised = AutoModelForCausalLM.from_pretrained(directory, gguf_file=args.gguf_file, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=args.gguf_file)
    config = quantised.config
    if hasattr(config, "quantization_config"):  # the plain copy is not quantised
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    plain.load_state_dict(quantised.state_dict())
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        gap = (plain(ids).logits - quantised(ids).logits).abs().max().item()
    if gap > 1e-5:
        sys.exit(f"gguf_to_hf: the plain copy's logits differ from the GGUF model's by {gap:.3g}; nothing written")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"gguf_to_hf: wrote {out} ({sum(p.numel() for p in plain.parameters()):,} parameters; logits gap {gap:.1g})")


if __name__ == "__main__":
    main()

"""How much of a count word survives the text encoder? The spread of the denoiser's text context across counts.

    python scripts/context_spread.py --model models/shapes-sd15 --out runs/context-base.json

Soft tokens (and a LoRA on the denoiser) act after the text encoder: they can re-weight what the context holds, but
they cannot put back what the encoder dropped. This measures what it holds. For every shape, the captions
"a photo of k <shapes>" (k = 2..5) are encoded through the pipeline's own `encode_prompt`; the *count spread* is the
mean squared distance of those contexts from their mean (summed over tokens and channels). The *shape spread* is the
same across the six shapes at a fixed count, and the *colour spread* across colours of one object, the references:
a model that reads shapes but not counts has a count / shape ratio near 0. Measured in seconds, no image drawn.
`--soft-tokens` is not taken: the tokens are the same for every caption, so they add no spread of their own.
"""

from __future__ import annotations

import argparse

import torch


def spread(contexts: torch.Tensor) -> float:
    """Mean squared distance of `contexts` `(n, tokens, channels)` from their mean, summed over tokens and channels."""
    centred = contexts.float() - contexts.float().mean(dim=0, keepdim=True)
    return float((centred**2).sum(dim=(1, 2)).mean())


def context_spreads(encode) -> dict:
    """Count, shape and colour spreads of the contexts `encode(captions) -> (n, tokens, channels)` gives."""
    from softalign.shapes.vocabulary import COLORS, NUMBER_WORDS, PLURALS, SHAPES, TRAIN_COUNTS

    count = [spread(encode([f"a photo of {NUMBER_WORDS[k]} {PLURALS[s]}" for k in TRAIN_COUNTS])) for s in SHAPES]
    shape = [spread(encode([f"a photo of {NUMBER_WORDS[k]} {PLURALS[s]}" for s in SHAPES])) for k in TRAIN_COUNTS]
    colour = [spread(encode([f"a photo of a {c} {s}" for c in COLORS])) for s in SHAPES]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    result = {"count_spread": mean(count), "shape_spread": mean(shape), "colour_spread": mean(colour)}
    result["count_over_shape"] = result["count_spread"] / result["shape_spread"]
    result["colour_over_shape"] = result["colour_spread"] / result["shape_spread"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shapes-sd15")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="Also write the result here (JSON).")
    args = parser.parse_args()
    from count_listening import print_and_write

    from softalign import load_pipeline
    from softalign.families import backbone_for

    torch.set_num_threads(args.threads)
    backbone = backbone_for(load_pipeline(args.model))
    result = context_spreads(lambda captions: backbone.encode_prompts(captions)["prompt_embeds"])
    result["model"] = args.model
    print_and_write(result, args.out)


if __name__ == "__main__":
    main()

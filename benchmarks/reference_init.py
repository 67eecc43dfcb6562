"""A source model whose weights start as the reference implementations start theirs.

    python benchmarks/reference_init.py --cohort demo_out/cohort --seed 0 --out source_refinit.safetensors

The engine's networks start from PyTorch's default initialisation (Docs/method.md, "Where the code
departs from the reference implementations"). UNIT's trainer, whose networks the paper takes,
re-draws every convolution after building them: Kaiming-normal (fan in, gain for ReLU) in the
generators, N(0, 0.02) in the discriminator, biases 0. This script trains `train-source` on the
cohort's MR training scans (``splits.json``) with the engine's own ``train.train_source``, the
networks drawn that way (the segmenter as the generators: UNIT's trainer applies its rule to every
module it holds); everything else is the engine's. Adapt the result with
``benchmarks/adaptation_curves.py`` to compare it with a default source model
(Docs/results.md, "The reference implementations' initialisation"). The model file does not
record how its networks were drawn: keep it apart from the engine's own models.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# common also puts the engine on sys.path, as for every benchmark script
from common import check_output, count, run_main

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vaeuda import train  # noqa: E402
from vaeuda.demo import cohort_split, image_of, label_of  # noqa: E402
from vaeuda.nets import VAEUDANet  # noqa: E402


def reference_init(net: VAEUDANet) -> None:
    """Re-draw every convolution of ``net`` in place (UNIT's ``weights_init``): N(0, 0.02) in the
    discriminator, Kaiming-normal (fan in, a = 0) elsewhere; biases 0. Norm layers keep theirs."""
    with torch.no_grad():
        for name, module in net.named_modules():
            if isinstance(module, nn.Conv2d):
                if name.split(".")[0] == "disc":
                    nn.init.normal_(module.weight, 0.0, 0.02)
                else:
                    nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


class ReferenceInitNet(VAEUDANet):
    """VAEUDANet drawn as :func:`reference_init` says (from torch's global generator, which
    ``train_source`` seeds just before it builds the networks)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        reference_init(self)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", required=True, type=Path, help="a synthetic cohort (vaeuda synth or demo)")
    parser.add_argument("--out", required=True, help="the source model file to write")
    parser.add_argument("--seed", type=count(0), default=0)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--iterations", type=count(), default=None, help="default: the preset's")
    args = parser.parse_args()
    check_output(args.out)
    prefixes = cohort_split(args.cohort, "mr", "train")
    train.VAEUDANet = ReferenceInitNet       # (train_source builds the networks through this name)
    train.train_source([image_of(args.cohort, p) for p in prefixes], [label_of(args.cohort, p) for p in prefixes],
                       args.out, preset=args.preset, iterations=args.iterations, seed=args.seed, device="cpu")
    print(f"Wrote {args.out}.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

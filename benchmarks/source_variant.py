"""A source model built or drawn otherwise than the engine's preset, for the studies that compare them.

    python benchmarks/source_variant.py --cohort demo_out/cohort --seed 0 --out source_res4.safetensors --net n_res_domain=2
    python benchmarks/source_variant.py --cohort demo_out/cohort --seed 0 --out source_refinit.safetensors --reference-init

Trains `train-source` on the cohort's MR training scans (``splits.json``) with the engine's own
``train.train_source``; only the networks differ:

- ``--net FIELD=VALUE`` (repeatable) replaces fields of the preset's ``nets.NetConfig``, such as
  ``n_res_domain=2`` for the 4 residual blocks on each side of UNIT's generators. The model file
  holds the whole configuration, so ``adapt``, ``segment`` and ``benchmarks/adaptation_curves.py``
  rebuild the same networks from it. (The decoder layer norm of that study, ``dec_norm="ln"``, is a
  field only an engine with ``benchmarks/patches/decoder_layer_norm.patch`` applied has.)
- ``--reference-init`` re-draws every convolution as UNIT's trainer does (its ``weights_init``):
  Kaiming-normal (fan in, gain for ReLU) in the generators, N(0, 0.02) in the discriminator,
  biases 0; the segmenter as the generators (UNIT's trainer applies its rule to every module it
  holds). The model file does not record how its networks were drawn: keep it apart from the
  engine's own models.

The engine's networks are otherwise PyTorch's defaults at the preset's layout (Docs/method.md,
"Where the code departs from the reference implementations"). Adapt the result with
``benchmarks/adaptation_curves.py`` to compare it with a default source model (Docs/results.md,
"The reference implementations' initialisation", "UNIT's generator layout").
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

# common also puts the engine on sys.path, as for every benchmark script
from common import check_output, count, parsed_set_options, run_main

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vaeuda import train  # noqa: E402
from vaeuda.demo import cohort_split, image_of, label_of  # noqa: E402
from vaeuda.errors import VaeudaError  # noqa: E402
from vaeuda.nets import NetConfig, VAEUDANet, get_preset  # noqa: E402


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


def preset_with(preset: str, fields: dict) -> NetConfig:
    """The preset's configuration with ``fields`` replaced, checked as a model file's would be
    (an unknown field or a value no network of the engine has is a VaeudaError)."""
    base = get_preset(preset).to_dict()
    unknown = sorted(set(fields) - set(base))
    if unknown:
        raise VaeudaError(f"--net {unknown[0]}: the network configuration has no such field; it has {', '.join(base)}.")
    return NetConfig.from_dict({**base, **fields})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", required=True, type=Path, help="a synthetic cohort (vaeuda synth or demo)")
    parser.add_argument("--out", required=True, help="the source model file to write")
    parser.add_argument("--seed", type=count(0), default=0)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--iterations", type=count(), default=None, help="default: the preset's")
    parser.add_argument("--net", action="append", default=[], metavar="FIELD=VALUE",
                        help="replace a field of the preset's network configuration (nets.NetConfig), e.g. "
                             "n_res_domain=2; values are JSON; repeatable")
    parser.add_argument("--reference-init", action="store_true",
                        help="draw the convolutions as UNIT's trainer does, not with PyTorch's defaults")
    args = parser.parse_args()
    fields = parsed_set_options(parser, args.net, option="--net", example="n_res_domain=2")
    net_cfg = preset_with(args.preset, fields)          # refused here, before any volume is read
    check_output(args.out)
    prefixes = cohort_split(args.cohort, "mr", "train")
    # train_source builds its networks through these two names
    train.get_preset = lambda name: dataclasses.replace(net_cfg) if name == args.preset else get_preset(name)
    if args.reference_init:
        train.VAEUDANet = ReferenceInitNet
    train.train_source([image_of(args.cohort, p) for p in prefixes], [label_of(args.cohort, p) for p in prefixes],
                       args.out, preset=args.preset, iterations=args.iterations, seed=args.seed, device="cpu")
    built = f"the {args.preset} preset's networks" + (f" with {fields}" if fields else "")
    drawn = "UNIT's initialisation" if args.reference_init else "PyTorch's initialisation"
    print(f"Wrote {args.out}: {built}, {drawn}.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

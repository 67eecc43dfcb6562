"""Paired alignment: can the target encoder map CT into the source latent at all?

    python benchmarks/paired_alignment.py --model demo_out/models/source.safetensors \\
        --cohort demo_out/cohort --out paired.json

A diagnostic that only a phantom allows. The cohort's MR training subjects are drawn again as CT
(``phantom.simulate_subject`` with the same subject seed: the same body), moved into the body's
frame (``phantom.body_frame``) and cut on each MR volume's slice grid, so every MR slice has a CT
slice of the same anatomy. Starting from the source model (E_T a copy of E_S), **only E_T** is
trained, with a supervised signal the method never has: the mean squared difference between the
posterior means mu_T(x_CT) and mu_S(x_MR) (E_Z and everything else frozen; Seg is the source
model's). Every ``--every`` iterations the cohort's CT test volumes are segmented through E_T.
``--own-target-encoder`` starts instead from an adapted model's own E_T (its E_S and E_Z are the
adapted model's too): with ``--iterations 0`` it measures how far adaptation took E_T from the
aligned encoder.

What it tells: how far latent alignment through E_T alone can take the source model, i.e. whether
the architecture or the unsupervised alignment signal (KL, adversarial, cycle) is what limits
adaptation. At the end it records the LV border contrast (``vaeuda.diagnose``) of x_TS with the
final E_T (D_T is still the source model's copy of D_S, so only x_TS means something) and the
closed-form KL of E_T's posterior on CT, before and after.

``--disc-on SCAN`` also trains, before E_T moves, a fresh discriminator of the model's architecture
(``--disc-steps``, LSGAN as the engine's) on real MR training slices against x_TS = D_S(D_Z(mu_T))
of that one CT scan, and records at each evaluation its mean score (real 1, fake 0) of real MR and
of that scan's x_TS: how an informed discriminator rates the aligned encoder.
``--objective adversarial`` (needs ``--disc-on``) replaces the paired loss by the method's
generator-side L^T_adv on that scan's slices against this discriminator (held fixed, or still
learning with ``--disc-learns``): where the adversarial term alone takes E_T, in latent distance
to the aligned encoder and in Dice.

``--latent-probe SCAN`` records at each evaluation ``adaptation_curves.latent_probe`` with that
CT scan as the probe's target training scan (the same sets as ``adaptation_curves.py --target
SCAN --latent-probe`` on the default validation scans): whether the aligned encoder also makes the
two encodings indistinguishable.

Prints one JSON line per evaluation; ``--out`` also gets the whole record.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

# common also puts the engine on sys.path, as for every benchmark script
from common import check_output, cohort_slices, count, positive_float, run_main, write_record
from adaptation_curves import (default_validation_scans, fixed_slices, latent_probe_of,  # noqa: E402
                               latent_probe_sets, mean_score, posterior_summary)

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from vaeuda import phantom, volumes  # noqa: E402
from vaeuda.demo import cohort_split, image_of, read_splits  # noqa: E402
from vaeuda.diagnose import translation_contrast  # noqa: E402
from vaeuda.errors import VaeudaError  # noqa: E402
from vaeuda.experiment import HeldOutDiceProbe  # noqa: E402
from vaeuda.labels import MMWHS  # noqa: E402
from vaeuda.losses import gan_loss  # noqa: E402
from vaeuda.modelfile import load_model  # noqa: E402
from vaeuda.nets import MultiScaleDiscriminator  # noqa: E402
from vaeuda.train import TrainConfig  # noqa: E402

SCORED_SLICES = 96        # fixed slices per image kind for the informed discriminator's scores
ENGINE_ADAM = TrainConfig()  # the engine's Adam defaults (betas, weight decay), one source of truth


def paired_slices(cohort: Path, net_cfg, normalisation: dict):
    """(x_MR, x_CT, label agreement): the cohort's MR training subjects and their CT renderings,
    both (N, 3, S, S) on each MR volume's slice grid. Label agreement: the fraction of voxels
    labelled in either rendering whose class is the same in both (1 for a perfect overlay; the CT
    is drawn on another grid, so a little less)."""
    splits = read_splits(cohort)
    generator = splits.get("generator")
    if not str(generator or "").startswith("vaeuda.phantom"):
        raise VaeudaError(f"{cohort}: not a phantom cohort (splits.json names no vaeuda.phantom generator).")
    if generator != phantom.GENERATOR:
        raise VaeudaError(f"{cohort}: made by {generator}, this engine draws {phantom.GENERATOR}.")
    if isinstance(splits.get("seed"), bool) or not isinstance(splits.get("seed"), int):
        raise VaeudaError(f"{cohort}: splits.json records no integer cohort seed, so its subjects cannot be drawn again.")
    xs_mr, xs_ct, same, labelled = [], [], 0, 0
    for prefix in cohort_split(cohort, "mr", "train"):
        index = int(prefix.rsplit("_", 1)[1]) - phantom.FIRST_ID
        subject_seed = phantom.cohort_subject_seed(splits["seed"], "mr", index)
        mr = phantom.simulate_subject("mr", subject_seed, splits.get("size"))
        on_disk = volumes.read_image(image_of(cohort, prefix))   # kept alive: a view of a freed image crashes
        if not np.array_equal(sitk.GetArrayViewFromImage(mr.image), sitk.GetArrayViewFromImage(on_disk)):
            raise VaeudaError(f"{cohort}: {prefix} is not the subject its seed draws; the pairing would be wrong.")
        ct = phantom.simulate_subject("ct", subject_seed, splits.get("size"))
        grid = volumes.SliceGrid.from_image(mr.image, net_cfg.input_size, net_cfg.slice_fov_mm)
        # the CT normalised on its own volume, as the engine reads any CT, then moved into the body frame
        ct_norm = volumes.normalised_image(ct.image, normalisation)
        xs_mr.append(torch.from_numpy(grid.image_slices(mr.image, normalisation)))
        xs_ct.append(torch.from_numpy(grid.resampled_slices(phantom.body_frame(ct_norm, "ct"))))
        mr_classes = volumes.label_classes(mr.label, MMWHS)
        ct_on_mr = sitk.Resample(phantom.body_frame(volumes.label_classes(ct.label, MMWHS), "ct"), mr_classes,
                                 sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        a, b = grid.label_slices(mr_classes), grid.label_slices(ct_on_mr)
        either = (a > 0) | (b > 0)
        same += int((a[either] == b[either]).sum())
        labelled += int(either.sum())
    return torch.cat(xs_mr), torch.cat(xs_ct), same / max(labelled, 1)


def x_ts(net, x: torch.Tensor) -> torch.Tensor:
    """CT rendered as MR from the target posterior mean: D_S(D_Z(mu_T(x))), (N, 3, S, S)."""
    return net.decode(net.posterior(x, "target")[0], "source")


class InformedDiscriminator:
    """A fresh Disc of ``net``'s configuration that learns real MR slices (N, 3, S, S) against x_TS
    of one CT scan's slices, with Adam as the engine's discriminator (``TrainConfig``'s betas and
    weight decay)."""

    def __init__(self, net, mr: torch.Tensor, ct: torch.Tensor, lr: float, batch_size: int, gen: torch.Generator):
        self.disc = MultiScaleDiscriminator(net.cfg)
        self.opt = torch.optim.Adam(self.disc.parameters(), lr=lr, betas=ENGINE_ADAM.betas,
                                    weight_decay=ENGINE_ADAM.weight_decay)
        self.mr, self.ct, self.batch_size, self.gen = mr, ct, batch_size, gen

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return x[torch.randint(len(x), (self.batch_size,), generator=self.gen)]

    def step(self, net) -> None:
        real = self.batch(self.mr)
        with torch.no_grad():
            fake = x_ts(net, self.batch(self.ct))
        loss = gan_loss(self.disc(real), True) + gan_loss(self.disc(fake), False)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def scores(self, net, seed: int) -> dict:
        return {"x_S": mean_score(self.disc, fixed_slices(self.mr, SCORED_SLICES, seed)),
                "x_TS": mean_score(self.disc, x_ts(net, fixed_slices(self.ct, SCORED_SLICES, seed)))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a source model file")
    p.add_argument("--cohort", required=True, help="the phantom cohort the model was trained on (splits.json)")
    p.add_argument("--iterations", type=count(0), default=300, help="E_T steps (default 300)")
    p.add_argument("--every", type=count(), default=100, help="evaluate every N steps (default 100)")
    p.add_argument("--batch-size", type=count(), default=8, help="paired slices per step (default 8)")
    p.add_argument("--lr", type=positive_float, default=5e-4,
                   help="Adam learning rate for E_T (the cpu preset adapts at 5e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--threads", type=count(), default=1, help="torch threads (default 1)")
    p.add_argument("--own-target-encoder", action="store_true",
                   help="start from the model's own E_T (an adapted model: where adaptation left it) instead of "
                        "a copy of E_S; with --iterations 0, only measure it")
    p.add_argument("--disc-on", metavar="SCAN", help="train an informed discriminator on real MR against this CT "
                                                     "scan's x_TS (a scan prefix, e.g. ct_1013) and record its scores")
    p.add_argument("--disc-steps", type=count(0), default=400,
                   help="discriminator steps before E_T moves (default 400)")
    p.add_argument("--objective", choices=("paired", "adversarial"), default="paired",
                   help="what E_T minimises: the paired latent distance (default) or L^T_adv against the discriminator")
    p.add_argument("--disc-learns", action="store_true", help="with --objective adversarial: one discriminator "
                                                             "step per E_T step, as in the method")
    p.add_argument("--latent-probe", metavar="SCAN",
                   help="record the latent domain probe, trained on this CT scan (see adaptation_curves.py)")
    p.add_argument("--out", help="write the record to this JSON file")
    args = p.parse_args(argv)
    check_output(args.out, [args.model])         # at start-up: not a traceback after the whole run
    if args.objective == "adversarial" and not args.disc_on:
        p.error("--objective adversarial needs --disc-on SCAN (the discriminator it plays against).")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cohort = Path(args.cohort)
    net, meta = load_model(args.model)
    if args.own_target_encoder and not meta.get("has_target_encoder"):
        raise VaeudaError(f"{args.model}: --own-target-encoder needs an adapted model (this one is from the "
                          f"'{meta.get('stage')}' stage).")
    cfg, norm = net.cfg, meta["normalisation"]
    x_mr, x_ct, agreement = paired_slices(cohort, cfg, norm)
    device = torch.device("cpu")
    probe = HeldOutDiceProbe(cohort, cohort_split(cohort, "ct", "test"), cfg.input_size, cfg.slice_fov_mm,
                             norm, device)
    mr_set = cohort_slices(cohort, cohort_split(cohort, "mr", "train")[:2], cfg, norm, labelled=True)
    ct_val = cohort_slices(cohort, cohort_split(cohort, "ct", "train")[:4], cfg, norm, labelled=True)
    ct_scan = cohort_slices(cohort, [args.disc_on], cfg, norm).images if args.disc_on else None
    probe_sets = None
    if args.latent_probe:     # adaptation_curves.py's sets for --target SCAN and its default validation scans
        probe_sets = latent_probe_sets(cohort, mr_set.images,
                                       cohort_slices(cohort, [args.latent_probe], cfg, norm).images,
                                       default_validation_scans(cohort, args.latent_probe), cfg, norm)
    record = {"args": vars(args), "pairing": {"slices": len(x_mr), "label_agreement": round(agreement, 4)}}
    print(json.dumps(record["pairing"]), flush=True)

    if not args.own_target_encoder:
        net.copy_source_to_target()
    net.eval()
    target_means = posterior_summary(net, x_mr, "source")[0]      # what E_T should produce for the paired CT
    kl_before = posterior_summary(net, ct_val.images, "target")[1]
    for param in net.parameters():
        param.requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed)
    informed = None
    if ct_scan is not None:
        informed = InformedDiscriminator(net, x_mr, ct_scan, args.lr, args.batch_size, gen)
        for _ in range(args.disc_steps):
            informed.step(net)
    curve: List[dict] = []

    def evaluate(iteration: int) -> None:
        net.eval()
        scores = probe(iteration, net)
        mse = float(torch.mean((posterior_summary(net, x_ct, "target")[0] - target_means) ** 2))
        row = {"iteration": iteration, "latent_mse": round(mse, 4), "test": round(100 * scores["test_dice_mean"], 2),
               "test_per_structure": {k: round(100 * v, 2) for k, v in scores["test_dice"].items()}}
        if informed is not None:
            row["disc"] = informed.scores(net, args.seed)
        if probe_sets is not None:
            row["latent"] = latent_probe_of(net, probe_sets, args.seed)
        curve.append(row)
        print(json.dumps(row), flush=True)

    evaluate(0)
    for param in net.enc_t.parameters():
        param.requires_grad_(True)
    opt = torch.optim.Adam(net.enc_t.parameters(), lr=args.lr, betas=ENGINE_ADAM.betas)
    for it in range(1, args.iterations + 1):
        if args.objective == "adversarial":
            if args.disc_learns:
                net.eval()
                informed.step(net)
            net.enc_t.train()
            loss = gan_loss(informed.disc(x_ts(net, informed.batch(ct_scan))), True)
        else:
            net.enc_t.train()
            idx = torch.randint(len(x_ct), (args.batch_size,), generator=gen)
            loss = torch.mean((net.posterior(x_ct[idx], "target")[0] - target_means[idx]) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % args.every == 0 or it == args.iterations:
            evaluate(it)

    net.eval()
    rows = translation_contrast(net, mr_set.images, mr_set.labels, ct_val.images, ct_val.labels)
    record.update(curve=curve, kl={"E_T on CT, before": round(kl_before, 4),
                                   "E_T on CT, after": round(posterior_summary(net, ct_val.images, "target")[1], 4),
                                   "E_S on MR": round(posterior_summary(net, mr_set.images, "source")[1], 4)},
                  x_ts_contrast={k: round(v, 3) for k, v in rows["x_TS (CT as MR)"].items()})
    print(json.dumps({"kl": record["kl"], "x_ts_contrast": record["x_ts_contrast"]}), flush=True)
    if args.out:
        write_record(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

"""The ``vaeuda`` command line. Every subcommand calls a plain function of the engine.

Errors are one sentence on stderr (``vaeuda: error: ...``), and with ``--progress json``
also a ``{"event": "error"}`` line on stdout; the exit status is then 2. Torch is imported
only by the subcommands that need it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional, Tuple

from . import __version__
from .choices import DEVICES, DOMAINS, PRESET_NAMES, check_portable
from .errors import MAX_SEED, VaeudaError, os_error_sentence
from .machine import PORTABLE_THREADS
from .progress import MODES, Reporter, emit, listed, write_stdout


# The arguments that name files or folders, of any command.
PATH_DESTS = ("out", "out_dir", "inputs", "targets", "model", "labels", "source_data", "pred", "ref", "json", "data")

# The commands that checkpoint as they train (--out MODEL, MODEL.ckpt, --resume).
TRAINING_COMMANDS = ("train-source", "adapt", "finetune")

DEVICE_HELP = "auto (default) uses a CUDA GPU when present (with bf16 autocast), else the CPU"

INTENSITY_REMAP_HELP = ("not part of the 2019 method: the source encoder reads randomly remapped intensities "
                        "(GIN, Ouyang et al. 2021) and must still reconstruct the MR, so the source model carries "
                        "over to CT better; adapting it added 5-7 points on one synthetic cohort and lost 15-25 on another "
                        "(Docs/results.md)")


LABELLED_HELP = ("labelled volume(s): X_image files, each with its X_label beside it (or --labels), or folders "
                 "of such pairs")


def _seed(text: str) -> int:
    """--seed: a whole number from 0 to MAX_SEED (argparse's usage error otherwise, not a traceback)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_SEED}, not {text!r}")
    return value


def _decay(text: str) -> float:
    """--ema-decay: 0 (off) or a number between 0 and 1, refused before any volume is read."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value == 0.0 or 0.0 < value < 1.0):
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a number between 0 and 1, not {text!r}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=MODES, default="auto",
                   help="progress display: tty bar with ETA, json lines (for Slicer), or none; log lines go to "
                        "stderr except in json mode (default: auto, tty on a terminal)")


def _numerics(p: argparse.ArgumentParser) -> None:
    p.add_argument("--portable", action="store_true",
                   help=f"kernels that do not depend on the CPU's instruction set, {PORTABLE_THREADS} threads, CPU "
                        "only: the same numbers under any thread count or instruction-set limit of this CPU model "
                        "(not across CPU makers, as measured); 3.5-6x slower (vaeuda.machine)")


def _training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--iterations", type=int, help="training iterations (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="slices per batch (default: the preset's)")
    p.add_argument("--seed", type=_seed, default=0, help="seeds every randomness (default 0)")
    p.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt if an earlier run was interrupted")
    _numerics(p)


class _Parser(argparse.ArgumentParser):
    """argparse, saying why the volumes are missing when an option of several values took them:
    ``--labels a_label b_image`` reads b_image as a label, as the usage line's order invites."""

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        given = getattr(self, "_given", [])
        if message.startswith("the following arguments are required"):
            # an option of several values took them: the last option given (nothing after it stopped it),
            # or one that took more than one value (a label and the image after it) before another option
            several = {s for a in self._actions if a.nargs == "+" for s in a.option_strings}
            options = [i for i, t in enumerate(given) if t.startswith("-")]
            last = next((given[i] for i, j in zip(options, options[1:] + [len(given)])
                         if given[i] in several and (j == len(given) or j - i > 2)), None)
            missing = [a.metavar for a in self._actions if not a.option_strings and a.metavar and a.metavar in message]
            if last and missing:
                message += f" ({last} took every value after it: give {missing[0]} first)"
        # argparse takes any word starting with "-" for an option, even the name of a file that is there
        known = {s for a in self._actions for s in a.option_strings}
        options_part = given[:given.index("--")] if "--" in given else given
        dashed = next((t for t in options_part if t.startswith("-") and t.split("=", 1)[0] not in known
                       and os.path.lexists(t)), None)
        if dashed:
            message += (f" ({dashed} was taken for an option: give a file whose name starts with '-' as "
                        f"{os.path.join('.', dashed)}, or after --)")
        if _progress_given(options_part, known) == "json":
            emit("error", message=message)    # as the module docstring promises a json reader; the bare sentence
        super().error(message)


def _progress_given(tokens: List[str], known) -> Optional[str]:
    """The ``--progress`` mode the command line gives, as argparse reads it: the last one, written
    ``--progress json`` or ``--progress=json`` or with the name shortened as far as it stays unique
    among ``known`` option names (``--prog json``); None if none is given."""
    mode = None
    for i, token in enumerate(tokens):
        name, equals, value = token.partition("=")
        if name == "--progress" or (len(name) > 2 and "--progress".startswith(name)
                                    and [k for k in known if k.startswith(name)] == ["--progress"]):
            mode = value if equals else (tokens[i + 1] if i + 1 < len(tokens) else None)
    return mode


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vaeuda", description=(
        "Data-efficient unsupervised domain adaptation for cross-modality cardiac segmentation "
        "(Ouyang et al., MICCAI 2019): train on labelled MR, adapt with one unlabelled CT."))
    parser.add_argument("--version", action="version", version=f"vaeuda {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic cardiac MR/CT cohort in the MM-WHS file convention")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write into (refused if it holds files of the "
                                                       "cohort's names that no earlier synth wrote)")
    # the defaults are phantom.N_SOURCE, N_TARGET, N_TRAIN (a test holds them equal; phantom loads SimpleITK)
    p.add_argument("--n-source", type=int, default=20, help="MR subjects (default %(default)s, at most 8999)")
    p.add_argument("--n-target", type=int, default=20, help="CT subjects (default %(default)s, at most 8999)")
    p.add_argument("--n-train", type=int, default=16, help="training subjects per modality (default %(default)s)")
    p.add_argument("--seed", type=_seed, default=0, help="cohort seed: the same seed, the same files (default 0)")
    p.add_argument("--size", type=int, help="voxels per side, 16 to 512 (phantom.MIN_SIZE, MAX_SIZE; default: "
                                            "realistic per modality)")
    _common(p)

    p = sub.add_parser("train-source", help="train the source model on labelled volumes")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help=LABELLED_HELP)
    p.add_argument("--out", required=True, help="model file to write (.safetensors)")
    p.add_argument("--preset", choices=PRESET_NAMES, help="default: paper with CUDA, cpu without")
    p.add_argument("--labels", nargs="+", action="extend", help="label files in the same order as the images")
    p.add_argument("--label-convention", default="mmwhs", help="mmwhs (default), consecutive, or a JSON mapping file")
    p.add_argument("--input-size", type=int, metavar="S",
                   help="slice size in pixels instead of the preset's (cpu 64, paper 256; a multiple of 4)")
    p.add_argument("--intensity-remap", action="store_true", help=INTENSITY_REMAP_HELP)
    _training(p)
    _common(p)

    p = sub.add_parser("adapt", help="adapt a source model to unlabelled target volumes (one is enough)")
    p.add_argument("targets", nargs="+", metavar="TARGET",
                   help="unlabelled target volume(s) (file, DICOM folder, or folder of *_image volumes)")
    p.add_argument("--model", required=True, help="source model file")
    p.add_argument("--out", required=True, help="adapted model file to write")
    p.add_argument("--no-kl", action="store_true", help="ablation: no prior matching (KL terms off)")
    p.add_argument("--no-adv", action="store_true", help="ablation: no domain-adversarial terms")
    p.add_argument("--no-cycle", action="store_true", help="ablation: no T->S->T cycle consistency")
    p.add_argument("--no-task-consistency", action="store_true", help="ablation: no task consistency")
    p.add_argument("--slices", metavar="A:B",
                   help="use only coronal slices A to B-1 of the target (few-shot; B excluded, as a Python slice)")
    p.add_argument("--early-stop", type=int, metavar="PATIENCE",
                   help="stop when the unsupervised proxy (the mean T->S->T cycle error on the target slices) has not "
                        "improved for PATIENCE evaluations; keep the best")
    p.add_argument("--source-data", nargs="+", action="extend",
                   help="labelled source volumes (default: the paths recorded in the model)")
    p.add_argument("--ema-decay", type=_decay, metavar="D",
                   help="keep and save an exponential moving average of the weights with decay D "
                        "(default: the preset's, train.ADAPT_TRAINING; 0 saves the last iterate)")
    _training(p)
    _common(p)

    p = sub.add_parser("finetune", help="the oracle: supervised fine-tuning on labelled target volumes")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help=LABELLED_HELP)
    p.add_argument("--model", required=True, help="source model file")
    p.add_argument("--out", required=True, help="fine-tuned (oracle) model file to write")
    p.add_argument("--labels", nargs="+", action="extend", help="label files in the same order as the images")
    _training(p)
    _common(p)

    p = sub.add_parser("segment", help="segment volumes: writes DIR/<name>_seg.nii.gz on the exact input grid")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="volume(s) to segment (file, DICOM folder, or folder of *_image volumes)")
    p.add_argument("--model", required=True, help="model file (source, adapted or fine-tuned)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    p.add_argument("--batch-size", type=int, default=16,
                   help="slices per forward pass (bounds memory; default %(default)s)")
    p.add_argument("--domain", choices=DOMAINS,
                   help="the encoder to segment with (default: target for an adapted model, else source; target "
                        "is refused for a model that was never adapted)")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="bf16 autocast on the CPU too (as on CUDA): 1.6-1.9x faster on CPUs with native bf16 "
                        "(AVX512-BF16, AMX), slower where it is emulated; a few voxels may change label")
    _numerics(p)
    _common(p)

    p = sub.add_parser("evaluate", help="Dice and ASSD of predictions against references, paired by name")
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of segmentations (<name>_seg.nii.gz)")
    p.add_argument("--ref", required=True, metavar="DIR",
                   help="folder of reference label files (<name>_label.* or <name>.*); extra ones are skipped")
    # --labels: the option's first name, kept for scripts (elsewhere --labels names label files)
    p.add_argument("--label-convention", "--labels", dest="label_convention", default="mmwhs",
                   help="label values of both folders: mmwhs (default), consecutive, or a JSON mapping file")
    p.add_argument("--pred-label-convention", metavar="CONVENTION",
                   help="label values of the segmentations where they differ from the references' (a model trained "
                        "in other values): mmwhs, consecutive, or a JSON mapping file (default: --label-convention)")
    p.add_argument("--json", help="where to write the JSON (default: PRED/evaluation.json)")
    _common(p)

    p = sub.add_parser("convert", help="write released PnP-AdaNet/SIFA .npz / .tfrecords files as the "
                                       "X_image / X_label NIfTI pairs the other commands read")
    p.add_argument("inputs", nargs="+", metavar="FILE", help="released .npz volumes and/or .tfrecords slices")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", help="the volume the .tfrecords files make together: their slices, one per record, "
                                  "stacked in the order given (give one scan's slices in slice order)")
    p.add_argument("--split", action="store_true",
                   help="cut the .tfrecords stack where a slice does not follow the one before as its record stores "
                        "(another scan begins): volumes NAME_001, NAME_002, ... (records written in slice order from "
                        "scans; the release's own training .tfrecords are shuffled, augmented slices, which make no "
                        "scan and are refused)")
    p.add_argument("--flip-test-volume", action="store_true",
                   help="SIFA's released .npz test volumes are stored flipped on both in-plane axes; flip them back, "
                        "as its evaluate.py does")
    p.add_argument("--label-convention", default="mmwhs",
                   help="label values to write: mmwhs (default: 205, 420, 500, 820), consecutive (1-4), "
                        "or a JSON mapping file")
    _common(p)

    p = sub.add_parser("info", help="print a model file's metadata as JSON, with the SHA-256 of its weights")
    p.add_argument("model", metavar="MODEL", help="model file (.safetensors)")
    _common(p)

    p = sub.add_parser("numerics", help="print what decides this computer's rounding as JSON: CPU, threads, "
                                        "kernels, kernel variables and a fingerprint of the kernels")
    _numerics(p)
    _common(p)

    p = sub.add_parser("demo", help="the whole pipeline on a synthetic cohort, with a report")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--quick", action="store_true", help="a smoke run of the same pipeline at the tiny preset (seconds; its numbers mean nothing)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seeds the cohort, the draw of the adaptation scan and every training (default 0)")
    p.add_argument("--intensity-remap", action="store_true", help="train the source model with --intensity-remap: "
                                                                  + INTENSITY_REMAP_HELP)
    p.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    _numerics(p)
    _common(p)

    p = sub.add_parser("experiment", help="the paper's experiments")
    esub = p.add_subparsers(dest="experiment", required=True)
    e = esub.add_parser("table1", help="Table 1 protocol with ablations on a cohort")
    e.add_argument("--data", required=True, help="cohort folder with splits.json")
    e.add_argument("--out", required=True,
                   help="output folder: table1.md, table1.json, table1_dice.png, curves.png, models/ and pred/")
    e.add_argument("--repeats", type=int, default=6, help="draws of the adaptation scan per row (default 6, as the paper)")
    e.add_argument("--preset", choices=PRESET_NAMES, default=None,
                   help="default: paper with CUDA, cpu without")
    e.add_argument("--seed", type=_seed, default=0,
                   help="seeds the draws of the adaptation scans and every training (default 0)")
    e.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    e.add_argument("--iterations-scale", type=float, default=1.0,
                   help="scale every stage's iterations (smoke runs; default 1)")
    _numerics(e)
    _common(e)
    return parser


def _print_result(command: str, result: dict, reporter: Reporter) -> None:
    """What info / numerics print: indented JSON for a reader; in --progress json mode, whose stdout
    is one event per line, the line ``{"event": COMMAND, COMMAND: result}``."""
    if reporter.mode == "json":
        write_stdout(json.dumps({"event": command, command: result}))
    else:
        write_stdout(json.dumps(result, indent=2))


def _labelled(args) -> tuple:
    from .data import ORACLE_TRAINING, SOURCE_TRAINING, find_pairs
    pairs = find_pairs(args.inputs, getattr(args, "labels", None),
                       ORACLE_TRAINING if args.command == "finetune" else SOURCE_TRAINING)
    return [p[0] for p in pairs], [p[1] for p in pairs]


def run(args, reporter: Reporter) -> List[str]:
    """Execute one parsed command; returns the paths it wrote. A training run holds its model file
    for the whole run: another with the same --out is refused meanwhile."""
    if args.command in TRAINING_COMMANDS:
        from .fileio import exclusive_model_output
        with exclusive_model_output(args.out):
            return _run(args, reporter)
    return _run(args, reporter)


def _run(args, reporter: Reporter) -> List[str]:
    cmd = args.command
    if getattr(args, "portable", False):
        check_portable(True, getattr(args, "device", "cpu"), getattr(args, "cpu_bf16", False))
        args.device = "cpu"
        from .machine import use_portable_numerics
        use_portable_numerics()      # before anything imports torch
    if cmd in TRAINING_COMMANDS:
        from .fileio import check_model_output, checkpoint_path
        # before anything else is said: a refused --out says one thing (the inputs as given, a label-mapping
        # file among them, are never overwritten; train checks it again with the volumes found in folders)
        given = [item for name in ("model", "inputs", "targets", "labels", "source_data")
                 for item in ([getattr(args, name)] if isinstance(getattr(args, name, None), str)
                              else getattr(args, name, None) or [])]
        check_model_output(args.out, given + _mapping_file(getattr(args, "label_convention", None)))
        ckpt = checkpoint_path(args.out)
        if ckpt.is_file() and not args.resume:    # another run's work: never thrown away unasked
            raise VaeudaError(f"{ckpt}: an interrupted run left this checkpoint; continue it with --resume, or "
                              f"delete it to start afresh.")
    if cmd == "synth":
        from .phantom import make_cohort
        make_cohort(args.out_dir, n_source=args.n_source, n_target=args.n_target, n_train=args.n_train,
                    seed=args.seed, size=args.size, reporter=reporter)
        return [str(Path(args.out_dir) / "splits.json")]
    if cmd == "train-source":
        from .labels import load_convention
        from .train import train_source
        images, labels = _labelled(args)
        train_source(images, labels, args.out, preset=args.preset, iterations=args.iterations,
                     batch_size=args.batch_size, seed=args.seed, device=args.device,
                     convention=load_convention(args.label_convention), resume=args.resume, reporter=reporter,
                     input_size=args.input_size, intensity_remap=args.intensity_remap)
        reporter.log(f"Wrote the source model to {args.out}.")
        return [args.out]
    if cmd == "adapt":
        from .data import find_images, parse_slice_range
        from .train import adapt
        adapt(args.model, find_images(args.targets), args.out, iterations=args.iterations, seed=args.seed,
              device=args.device, use_kl=not args.no_kl, use_adv=not args.no_adv, use_cycle=not args.no_cycle,
              use_task=not args.no_task_consistency, slice_range=parse_slice_range(args.slices),
              early_stop=args.early_stop, source_data=args.source_data, batch_size=args.batch_size,
              resume=args.resume, reporter=reporter,
              overrides=None if args.ema_decay is None else {"ema_decay": args.ema_decay})
        reporter.log(f"Wrote the adapted model to {args.out}.")
        return [args.out]
    if cmd == "finetune":
        from .train import finetune
        images, labels = _labelled(args)
        finetune(args.model, images, labels, args.out, iterations=args.iterations, seed=args.seed,
                 device=args.device, batch_size=args.batch_size, resume=args.resume, reporter=reporter)
        reporter.log(f"Wrote the fine-tuned model to {args.out}.")
        return [args.out]
    if cmd == "segment":
        from .data import find_images
        from .predict import segment_files
        written = segment_files(args.model, find_images(args.inputs), args.out, device=args.device,
                                batch_size=args.batch_size, domain=args.domain, reporter=reporter,
                                cpu_bf16=args.cpu_bf16)
        return [str(p) for p in written]
    if cmd == "evaluate":
        from .fileio import VOLUME_SUFFIXES, check_output_file, full_suffix, same_file
        from .labels import load_convention
        from .metrics import evaluate_dirs
        if Path(args.pred).is_file():     # else the default JSON path under it reads as the error
            raise VaeudaError(f"{args.pred}: is a file; --pred takes the folder of segmentations.")
        if same_file(args.pred, args.ref):
            raise VaeudaError(f"{args.pred}: is given as both --pred and --ref; keep the segmentations in a folder of "
                              f"their own (segment --out) and give the references' folder as --ref.")
        json_path = args.json or str(Path(args.pred) / "evaluation.json")
        kind = full_suffix(Path(json_path)).lower()
        if kind in VOLUME_SUFFIXES + (".safetensors", ".ckpt", ".npz", ".tfrecords"):   # a slip: a scan or model lost
            raise VaeudaError(f"{json_path}: --json writes the scores as JSON, but this is named as a '{kind}' file; "
                              f"name it .json.")
        check_output_file(json_path, _mapping_file(args.label_convention) + _mapping_file(args.pred_label_convention))
        pred_convention = None if args.pred_label_convention is None else load_convention(args.pred_label_convention)
        table, result = evaluate_dirs(args.pred, args.ref, load_convention(args.label_convention), json_path,
                                      ignore_unmatched_refs=True, pred_convention=pred_convention)
        skipped = result["unscored_references"]
        if skipped:    # e.g. --ref a whole cohort folder; a lost segmentation would only shrink N otherwise
            reporter.log(f"note: {len(skipped)} reference(s) without a prediction not scored: "
                         f"{listed([Path(p).name for p in skipped])}")    # a whole cohort's: 36 names
        from .labels import reference_lacks_note
        for path, keys in result["references_lacking"].items():   # (a reference in another convention, too)
            reporter.log(reference_lacks_note(Path(path).name, keys))
        if reporter.mode == "json":
            emit("table", markdown=table)
        else:
            write_stdout(table)
        reporter.log(f"Wrote the scores to {json_path}.")
        return [json_path]
    if cmd == "convert":
        from .formats import convert_released
        from .labels import load_convention
        out = Path(args.out)        # convert_released checks it is a folder it can write in
        try:
            before = {item.name for item in out.iterdir()} if out.is_dir() else set()
        except OSError as exc:
            raise VaeudaError(f"{out}: cannot list the output folder ({exc.strerror or exc}).") from None
        written, breaks = convert_released(args.inputs, args.out, load_convention(args.label_convention),
                                           name=args.name, flip_test_volume=args.flip_test_volume, split=args.split)
        if breaks:   # another scan, or a shell glob's order (slice10 before slice2)
            reporter.log(f"note: in {args.name}, {len(breaks)} slice(s) do not follow the one before as their records "
                         f"store ({listed(breaks)}): another scan begins there, or the files are out of order; "
                         f"--split cuts the volume there")
        volumes = [p.name[:-len("_image.nii.gz")] for p in written if p.name.endswith("_image.nii.gz")]
        replaced = [p.name for p in written if p.name in before]
        reporter.log(f"Wrote {len(volumes)} volume(s) to {out} as X_image / X_label .nii.gz pairs: "
                     f"{listed(volumes)}.")
        if replaced:   # said, since earlier files of those names are gone
            reporter.log(f"Replaced {len(replaced)} file(s) that were there: {listed(replaced)}.")
        if not args.flip_test_volume and any(str(p).lower().endswith(".npz") for p in args.inputs):
            # its authors' evaluation flips them by default ("if True:"), which is easy to miss
            reporter.log("note: the .npz volumes are written as stored; SIFA's released test volumes are stored "
                         "flipped on both in-plane axes, which its evaluate.py undoes: convert those with "
                         "--flip-test-volume")
        single = _single_slice_volumes([p for p in written if p.name.endswith("_image.nii.gz")])
        if single:     # written as asked, but every other command refuses a volume one slice thick
            from .fileio import stem
            # the remedy is for .tfrecords slices; a released .npz volume one voxel thick is the file's own shape
            stacked = set(single) - {stem(p) for p in args.inputs if str(p).lower().endswith(".npz")}
            reporter.log(f"note: {listed(single)} hold(s) a single slice; segment and the training commands read "
                         f"volumes of several slices" + (": give all of a scan's .tfrecords files to one convert, in "
                                                          "slice order (the release's own training .tfrecords are "
                                                          "shuffled slices, which make no scan)" if stacked else ""))
        return [str(p) for p in written]
    if cmd == "info":
        from .modelfile import build_from_meta, check_metadata, read_tensors
        tensors, meta, header = read_tensors(args.model)
        check_metadata(args.model, meta)
        build_from_meta(args.model, meta, tensors)   # refuses a configuration that builds no network
        # the checksum read_tensors verified: equal digests, equal weights (e.g. from two computers)
        _print_result("info", {"weights_sha256": header["tensors_sha256"], **meta}, reporter)
        return []
    if cmd == "numerics":
        from .machine import numerics
        _print_result("numerics", numerics(), reporter)
        return []
    if cmd == "demo":
        from .demo import run_demo
        return [str(p) for p in run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device,
                                         reporter=reporter, intensity_remap=args.intensity_remap)]
    if cmd == "experiment":
        from .experiment import run_table1
        return [str(p) for p in run_table1(args.data, args.out, repeats=args.repeats, preset=args.preset,
                                           seed=args.seed, device=args.device,
                                           iterations_scale=args.iterations_scale, reporter=reporter)]
    raise VaeudaError(f"unknown command {cmd}")


def _what_is_kept(args) -> Tuple[str, Optional[str]]:
    """After Ctrl-C in a training command: the sentence's tail saying where its checkpoint is and how
    to continue, or that none was written yet, and the checkpoint's path (None without one). (A
    checkpoint there is this run's, or the one it resumed: an earlier run's is refused without --resume.)"""
    if args.command not in TRAINING_COMMANDS:
        return "", None
    from .fileio import checkpoint_path      # not train's: torch may have been half imported when Ctrl-C came
    ckpt = checkpoint_path(args.out)
    if ckpt.is_file():
        return (f"; the last checkpoint is kept at {ckpt}: give the same command with --resume to continue",
                str(ckpt))
    return "; no checkpoint had been written yet", None


def _single_slice_volumes(images: List[Path]) -> List[str]:
    """The names (without ``_image.nii.gz``) of the written images that are one voxel thick along an axis."""
    import SimpleITK as sitk
    reader, single = sitk.ImageFileReader(), []
    for path in images:
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        if min(reader.GetSize()) == 1:
            single.append(path.name[:-len("_image.nii.gz")])
    return single


def _silence_stdout() -> None:
    """Point stdout at the null device (after its pipe broke, so that Python's final flush is quiet)."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):      # not a real file (e.g. captured by a test runner)
        pass
    finally:
        os.close(devnull)                            # stdout holds its own descriptor of it now


def _mapping_file(spec: Optional[str]) -> List[str]:
    """The label-mapping JSON file a ``--label-convention`` value names (an input), if any."""
    from .labels import BUILTIN_CONVENTIONS
    return [] if spec in (None, "") or spec in BUILTIN_CONVENTIONS else [spec]


def _joined_slice_ranges(argv: List[str]) -> List[str]:
    """``--slices -1:5`` as ``--slices=-1:5``: argparse takes a value starting with "-" for an option
    and would print its usage; joined, the range reaches the check that explains what is wrong.
    (``--sl``, as argparse shortens ``--slices``, too: no other option of ``adapt`` starts so.)"""
    out: List[str] = []
    for item in argv:
        if (out and len(out[-1]) > 3 and "--slices".startswith(out[-1]) and item.startswith("-")
                and item[1:2].isdigit()):
            out[-1] = f"{out[-1]}={item}"
        else:
            out.append(item)
    return out


def _innermost_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub)command's own parser that ``args`` were parsed by, e.g. ``vaeuda segment``'s."""
    while True:
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        chosen = getattr(args, action.dest, None) if action is not None else None
        if chosen not in (action.choices if action is not None else ()):
            return parser
        parser = action.choices[chosen]


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a job scheduler), ended as Ctrl-C ends a run: staging folders
    removed, the checkpoint kept and named, a sentence and an event, where the default action
    killed the process on the spot and left a half-written staging folder behind."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _out_of_memory(exc: BaseException) -> Optional[str]:
    """The detail of an allocation failure (torch's allocators raise RuntimeError), else None."""
    if isinstance(exc, MemoryError):
        return "a buffer could not be allocated"
    text = str(exc)
    # torch's CPU allocator says "can't allocate memory" on Linux and macOS, "not enough memory" on Windows
    if not (type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in text
            or "DefaultCPUAllocator: not enough memory" in text or "CUDA out of memory" in text):
        return None
    asked = re.search(r"(?:tried to allocate|allocate) ([0-9.]+ ?[KMGT]i?B|\d+ bytes)", text)
    if asked is None:
        return "an allocation failed"
    size = asked.group(1)
    if size.endswith(" bytes"):
        size = f"{int(size.split()[0]) / 2 ** 30:.3g} GiB"
    return f"{size} could not be allocated{' on the GPU' if 'CUDA' in text else ''}"


# What lowers a command's memory, for the out-of-memory sentence.
MEMORY_REMEDIES = {
    "train-source": "a smaller --batch-size or --input-size, or the cpu preset",
    "adapt": "a smaller --batch-size", "finetune": "a smaller --batch-size", "segment": "a smaller --batch-size",
}


def main(argv: Optional[List[str]] = None) -> int:
    # (only the main thread may set a handler: a caller running main() in another keeps its own)
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        return _main(argv)
    except _Terminated:     # before the command ran (parsing, imports) or once it had ended (its last lines)
        print("vaeuda: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if on_main_thread:  # (None: a handler not set from Python, which cannot be set back; the default then)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main(argv: Optional[List[str]]) -> int:
    parser = build_parser()
    argv = _joined_slice_ranges(sys.argv[1:] if argv is None else list(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:       # the command's own usage, not the list of every command that argparse would print
        before_command = argv.index(args.command) if args.command in argv else len(argv)
        given_to_vaeuda = any(item in argv[:before_command] for item in unknown)
        (parser if given_to_vaeuda else _innermost_parser(parser, args)).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    own = _innermost_parser(parser, args)
    for action in own._actions:      # a path "" would be taken as the current folder (Path("") is ".")
        if action.dest not in PATH_DESTS:
            continue                 # ("" has a meaning for some others: --label-convention's default, --slices all)
        value = getattr(args, action.dest, None)
        if value == "" or (isinstance(value, list) and "" in value):
            own.error(f"{action.option_strings[0] if action.option_strings else action.metavar}: an empty value "
                      f"was given")
    import SimpleITK as sitk
    # ITK's own warnings (e.g. for a folder without DICOM) would print beside the one sentence the
    # engine gives for the same problem.
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    reporter = Reporter(args.progress)
    try:
        return _run_and_report(args, reporter)
    except BrokenPipeError:
        # a reader went away (e.g. `... --progress json | head -1`), during the run or while its end
        # was reported: stop as a Unix tool does on SIGPIPE, without a traceback, and let nothing more
        # reach the closed pipe, not even at exit.
        _silence_stdout()
        try:
            reporter.close()
            print(f"vaeuda: stopped: the output pipe was closed{_what_is_kept(args)[0]}", file=sys.stderr)
        except OSError:                              # stderr was that pipe (2>&1 | head)
            pass
        return 141                                   # 128 + SIGPIPE, as a shell reports such an end


def _run_and_report(args, reporter: Reporter) -> int:
    """Run the command and report how it ended: the exit status."""
    def refused(message: str) -> int:
        reporter.close()
        if reporter.mode == "json":
            _final_event("error", message=message)
        print(f"vaeuda: error: {message}", file=sys.stderr)
        return 2

    try:
        outputs = run(args, reporter)
    except VaeudaError as exc:
        return refused(str(exc))
    except (MemoryError, RuntimeError) as exc:
        detail = _out_of_memory(exc)
        if detail is None:
            raise                            # a bug, to be seen whole
        remedy = MEMORY_REMEDIES.get(args.command)
        return refused(f"out of memory ({detail}): try {remedy + ', or ' if remedy else ''}a machine with more "
                       f"memory.")
    except BrokenPipeError:
        raise                                # main's: the reader went away
    except OSError as exc:
        sentence = os_error_sentence(exc)
        if sentence is None:
            raise                            # not the computer refusing the user's paths: a bug to see whole
        return refused(sentence)             # the writes are atomic, so nothing is half-written
    except KeyboardInterrupt as exc:
        reporter.close()
        kept, checkpoint = _what_is_kept(args)
        ended = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
        if reporter.mode == "json":
            _final_event("interrupted", message=f"{ended}{kept}", checkpoint=checkpoint)
        print(f"vaeuda: {ended}{kept}", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130      # 128 + the signal, as a shell reports it
    reporter.close()
    if reporter.mode == "json":
        refusal = _final_event("done", outputs=outputs)
        if refusal is not None:              # the outputs are written, but their reader cannot be told
            sentence = os_error_sentence(refusal)
            if sentence is None:
                raise refusal
            print(f"vaeuda: error: {sentence}", file=sys.stderr)
            return 2
    return 0


def _final_event(event: str, **fields) -> Optional[OSError]:
    """Emit the JSON event that ends a run; a standard output that refuses it (a full disk,
    /dev/full) is silenced and its error returned: stderr still tells. A closed pipe is main's."""
    try:
        emit(event, **fields)
    except BrokenPipeError:
        raise
    except OSError as exc:
        _silence_stdout()
        return exc
    return None

"""`hpc-multires data|train|plan|submit|report`: the entry point reads like a table of
contents."""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpc_multires import __version__
from hpc_multires.comm.ranks import mpi_world, rank_and_size, running_mpi
from hpc_multires.errors import UserError
from hpc_multires.train.preempt import PREEMPTED_EXIT, Preempted

OPTIONS = {"cosmoflow": ("size", "channels"), "neuron": ("bins", "probes"),
           "images": ("size", "channels"), "classes": ("size", "channels", "classes")}


def cmd_synth(args: argparse.Namespace) -> int:
    from hpc_multires.data.synth.writer import (
        synth_classes,
        synth_cosmoflow,
        synth_images,
        synth_neuron,
    )

    other = sorted({n for names in OPTIONS.values() for n in names} - set(OPTIONS[args.app]))
    given = [f"--{name}" for name in other if getattr(args, name) is not None]
    if given:
        verb = "does" if len(given) == 1 else "do"
        raise UserError(f"{' and '.join(given)} {verb} not apply to `data synth {args.app}`; "
                        f"its options are {', '.join('--' + n for n in OPTIONS[args.app])}")
    if args.app == "neuron":
        n = synth_neuron(args.out, num_samples=args.samples,
                         num_bins=1600 if args.bins is None else args.bins,
                         probes=4 if args.probes is None else args.probes, seed=args.seed,
                         samples_per_shard=args.samples_per_shard, overwrite=args.overwrite,
                         chunk=args.chunk)
    elif args.app == "images":
        n = synth_images(args.out, num_samples=args.samples,
                         size=64 if args.size is None else args.size,
                         channels=1 if args.channels is None else args.channels,
                         seed=args.seed,
                         samples_per_shard=args.samples_per_shard, overwrite=args.overwrite,
                         chunk=args.chunk)
    elif args.app == "classes":
        n = synth_classes(args.out, num_samples=args.samples,
                          size=64 if args.size is None else args.size,
                          classes=4 if args.classes is None else args.classes,
                          channels=1 if args.channels is None else args.channels,
                          seed=args.seed, samples_per_shard=args.samples_per_shard,
                          overwrite=args.overwrite, chunk=args.chunk)
    else:
        n = synth_cosmoflow(args.out, num_samples=args.samples,
                            size=32 if args.size is None else args.size,
                            channels=4 if args.channels is None else args.channels,
                            seed=args.seed,
                            samples_per_shard=args.samples_per_shard, overwrite=args.overwrite,
                            chunk=args.chunk)
    _say(f"wrote {args.samples} samples in {n} shard(s) to {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from hpc_multires.data.convert import convert_inputs

    if any(x.is_dir() for x in args.x):
        return convert_folder(args)
    names = args.label_names.split(",") if args.label_names else None
    wrote = convert_inputs(args.x, args.y, args.out, subvolume=args.subvolume,
                           stride=args.stride, samples_per_shard=args.samples_per_shard,
                           volumes_per_file=args.volumes_per_file, x_transform=args.transform,
                           label_names=names, scale_labels=not args.no_scale_labels,
                           overwrite=args.overwrite, compression=args.compression,
                           chunk=args.chunk)
    _say(f"wrote {wrote} to {args.out}")
    return 0


def convert_folder(args: argparse.Namespace) -> int:
    """`data convert --x FOLDER`: a folder of PNG/JPEG images."""
    from hpc_multires.data.convert_images import convert_images

    if len(args.x) > 1:
        raise UserError(f"--x takes one folder of images, not {len(args.x)} paths; put the "
                        "images in one folder")
    given = [flag for flag, value in (("--y", args.y), ("--label-names", args.label_names),
                                      ("--transform log1p", args.transform != "none"),
                                      ("--no-scale-labels", args.no_scale_labels),
                                      ("--subvolume", args.subvolume)) if value]
    if given:
        raise UserError(f"{', '.join(given)} do(es) not apply to a folder of images "
                        f"({args.x[0]}): images are stored as values in [0, 1], labelled by "
                        "their class sub-folder if they are in sub-folders, else unlabelled")
    n = convert_images(args.x[0], args.out, samples_per_shard=args.samples_per_shard,
                       overwrite=args.overwrite, compression=args.compression)
    _say(f"wrote {n} shard(s) to {args.out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from hpc_multires.data.inspect import inspect_store

    text, ok = inspect_store(args.dir, verify=not args.no_verify)
    _say(text)
    return 0 if ok else 1


def cmd_pyramid(args: argparse.Namespace) -> int:
    from hpc_multires.data.pyramid import build_pyramid

    r = build_pyramid(args.dir, args.levels)
    _say(f"pyramid levels 1..{args.levels}: {r['built']} shard(s) built, {r['skipped']} "
         f"already complete, of {r['shards']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hpc_multires.driver.run import train
    from hpc_multires.plan.load import load_config
    from hpc_multires.train.loop import StopAt

    cfg = load_config(args.config, args.set)
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise UserError(f"--stop-after-epoch {args.stop_after_epoch}: use 1 or more (the stop "
                        "comes with the checkpoint written at the end of that epoch)")
    if args.stop_stage is not None and args.stop_after_epoch is None:
        raise UserError("--stop-stage says which stage --stop-after-epoch counts in; "
                        "pass --stop-after-epoch N as well")
    stop = None if args.stop_after_epoch is None else StopAt(args.stop_after_epoch,
                                                             args.stop_stage)
    resume: bool | str = "auto" if args.auto_resume else args.resume
    result = train(cfg, run_dir=args.run_dir, resume=resume, stop=stop)
    if result.get("stopped"):
        _say("stopped as asked, with a checkpoint; continue with --resume")
    elif result.get("headline") in result:
        name = result["headline"]
        _say(f"done: {name} {result[name]:.4f} after {result['wall_s']:.1f} s")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from hpc_multires.driver.run import open_levels
    from hpc_multires.plan.cost import (
        describe_cost,
        describe_stages,
        parse_level_costs,
        plan_cost,
    )
    from hpc_multires.plan.load import load_config
    from hpc_multires.plan.stages import describe_plan, resolve

    cfg = load_config(args.config, args.set)
    if args.ranks < 1:
        raise UserError(f"--ranks {args.ranks}: give the number of ranks the job will run")
    measured = parse_level_costs(args.level_cost or "")
    stages = resolve(cfg, args.ranks)
    # The checks `train` makes before it starts: every level on disk, a model for each.
    stages, splits = open_levels(cfg, cfg.data, stages)
    shapes = {level: train.store.sample_shape for level, (train, _) in splits.items()}
    dims = len(shapes[min(shapes)]) - 1
    train_samples = len(splits[min(splits)][0].indices)
    share = 1.0
    if cfg.domain.on:
        from hpc_multires.methods.domain import subdomains

        spatial = shapes[stages[0].level][1:]
        part = subdomains(spatial, cfg.domain.grid, cfg.domain.overlap)[0]
        share = math.prod(part.shape) / math.prod(spatial)
    costs, waves = plan_cost(stages, args.ranks, dims, measured, args.shared_cores,
                             {level: shape[1:] for level, shape in shapes.items()},
                             train_samples, share)
    _say(f"plan of {args.config} on {args.ranks} rank(s), data {cfg.data.path}: "
         + ", ".join(f"level {lv} {tuple(shapes[lv])}" for lv in sorted(shapes)))
    _say(describe_plan(stages))
    _say(f"stages as they train ({train_samples} training samples; batch and lr after the "
         "per-level rules; cost in level-0 epochs on all ranks):")
    _say(describe_stages(stages, costs, train_samples))
    _say(describe_cost(costs, waves, args.ranks, dims, measured, args.shared_cores))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from hpc_multires.cli.submit import JobSpec, submit
    from hpc_multires.driver.run_dir import RunDir

    root = Path(__file__).resolve().parents[2]
    if not (root / "slurm" / "env.sh").is_file():
        raise UserError(f"hpc-multires submit writes scripts that source slurm/env.sh of the "
                        f"repository, and {root} is not one (the package is installed, not "
                        "checked out); install from a clone with `make setup` or "
                        "`pip install -e .`, or use slurm/*.sbatch from the repository")
    run_dir = (args.run_dir or Path("runs") / args.config.stem).absolute()
    job = JobSpec(config=args.config.absolute(), run_dir=run_dir, root=root, nodes=args.nodes,
                  ntasks_per_node=args.ntasks_per_node, cpus_per_task=args.cpus_per_task,
                  gpus_per_node=args.gpus_per_node, time=args.time,
                  job_name=args.job_name or f"hpcmr-{args.config.stem}",
                  partition=args.partition or "", account=args.account or "",
                  overrides=tuple(args.set))
    # The plan's checks for the job's rank count, before it waits in the queue: a global
    # batch that the ranks do not divide, or a group larger than the job, would only fail
    # once the job starts.
    from hpc_multires.plan.load import load_config
    from hpc_multires.plan.stages import resolve

    ranks = args.nodes * args.ntasks_per_node
    if args.config.is_file() and ranks >= 1:
        try:
            resolve(load_config(args.config, args.set), ranks)
        except UserError as e:
            raise UserError(f"{e} (the job runs {ranks} ranks: --nodes {args.nodes} x "
                            f"--ntasks-per-node {args.ntasks_per_node}); nothing submitted"
                            ) from None
    out = submit(job, args.dry_run)
    print(out if args.dry_run else
          f"submitted job {out}; output in {RunDir(run_dir).slurm_output(out)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hpc_multires.report import report

    _say(report(args.run_dirs, args.out))
    return 0


class _Help(argparse.HelpFormatter):
    """Help that shows an option's default where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = action.default is not None and action.default is not False \
            and action.default != [] and action.default is not argparse.SUPPRESS
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hpc-multires", formatter_class=_Help,
        description="Multi-resolution CNN training on large scientific arrays. Under MPI, "
                    "launch as `mpiexec -n N python -m mpi4py -m hpc_multires ...`.")
    p.add_argument("--version", action="version", version=f"hpc-multires {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)

    data = sub.add_parser("data", help="create, convert and inspect datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND",
                               parser_class=_Parser)
    synth = dsub.add_parser("synth", help="generate a synthetic dataset (parallel under mpiexec)")
    synth.add_argument("app", choices=["cosmoflow", "neuron", "images", "classes"],
                       help="cosmoflow: 3D fields (N, C, S, S, S); neuron: voltage traces "
                            "(N, probes, bins) of simulated neurons; images: 2D images "
                            "(N, C, S, S) in [0, 1] for restoration tasks; classes: 2D "
                            "images (N, C, S, S) in [0, 1] of K classes whose evidence is "
                            "spread over the image, for task.kind = \"classify\"")
    synth.add_argument("--out", type=Path, required=True, help="output directory")
    synth.add_argument("--samples", type=int, default=256, help="number of samples")
    synth.add_argument("--size", type=int, help="cosmoflow: side of the volume (default 32); "
                       "images, classes: side of the image (default 64)")
    synth.add_argument("--channels", type=int,
                       help="cosmoflow: growth stages per sample (default 4); images, "
                            "classes: 1 (grey, the default) or 3 (RGB)")
    synth.add_argument("--classes", type=int,
                       help="classes: the number of classes K, 2 to 16 (default 4)")
    synth.add_argument("--bins", type=int, help="neuron: time bins at 8 kHz (default 1600)")
    synth.add_argument("--probes", type=int, help="neuron: recorded compartments (default 4)")
    synth.add_argument("--seed", type=int, default=0, help="same seed, same dataset")
    synth.add_argument("--samples-per-shard", type=int, default=64, help="samples per file")
    synth.add_argument("--chunk", type=int, metavar="B",
                       help="store /x in blocks of B points per spatial axis, one channel "
                            "each, so that window and sub-volume reads touch only their "
                            "blocks (default: one sample per chunk)")
    synth.add_argument("--overwrite", action="store_true", help="replace a dataset in --out")
    synth.set_defaults(func=cmd_synth)

    conv = dsub.add_parser("convert", help="turn .npy/.npz arrays, a folder of PNG/JPEG "
                                           "images, or HDF5 files of large arrays, into a "
                                           "dataset")
    conv.add_argument("--x", type=Path, required=True, nargs="+", metavar="X",
                      help="inputs (N, C, *spatial) as .npy, or .npz with arrays x and y; a "
                           "folder of .png/.jpg images of one size (values stored in [0, 1], "
                           "for the image tasks), or a folder of one sub-folder of such "
                           "images per class (labelled by class, for task.kind = "
                           "\"classify\"); or HDF5 files of ExaLearn universes ('full', "
                           "'unitPar') or MRT/MRMF maps ('3Dmap', 'unitPar'), several at once")
    conv.add_argument("--y", type=Path, help="labels (N, P) as .npy (not needed with .npz)")
    conv.add_argument("--out", type=Path, required=True, help="output directory")
    conv.add_argument("--samples-per-shard", type=int, default=64, help="samples per file")
    conv.add_argument("--transform", choices=["none", "log1p"], default="none",
                      help="applied at read time (log1p for counts)")
    conv.add_argument("--label-names", help="comma-separated names of the P labels")
    conv.add_argument("--no-scale-labels", action="store_true",
                      help="keep labels as they are instead of mapping each to [-1, 1]")
    conv.add_argument("--compression", choices=["gzip", "lzf"], default=None)
    conv.add_argument("--chunk", type=int, metavar="B",
                      help="store /x in blocks of B points per spatial axis, one channel each "
                           "(default: one sample per chunk; with --subvolume, its size)")
    conv.add_argument("--subvolume", type=int, metavar="S",
                      help="keep the arrays whole (a volume store) and train on their "
                           "sub-volumes of S points per axis on a grid; --x is then "
                           "(V, C, *extent) with --y (V, P), or HDF5 files")
    conv.add_argument("--stride", type=int, metavar="T",
                      help="with --subvolume: a sub-volume every T points per axis "
                           "(default S: no overlap; less than S: overlapping)")
    conv.add_argument("--volumes-per-file", type=int, default=1, metavar="K",
                      help="with --subvolume: arrays per volume file")
    conv.add_argument("--overwrite", action="store_true", help="replace a dataset in --out")
    conv.set_defaults(func=cmd_convert)

    insp = dsub.add_parser("inspect", help="print schema, counts and verify checksums")
    insp.add_argument("dir", type=Path, help="dataset directory (shard-*.h5)")
    insp.add_argument("--no-verify", action="store_true", help="skip reading every byte")
    insp.set_defaults(func=cmd_inspect)

    pyr = dsub.add_parser("pyramid", help="add coarse levels 1..K to every shard (parallel)")
    pyr.add_argument("dir", type=Path, help="dataset directory (shard-*.h5)")
    pyr.add_argument("--levels", type=int, required=True, metavar="K",
                     help="coarsest level: each axis downsampled by 2^K")
    pyr.set_defaults(func=cmd_pyramid)

    tr = sub.add_parser("train", help="train as the config says (all ranks run this)")
    tr.add_argument("config", type=Path, help="TOML config, e.g. configs/cosmoflow-demo.toml")
    tr.add_argument("--run-dir", type=Path, help="where metrics, checkpoints and the resolved "
                    "config go (default runs/<run.name>)")
    tr.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value, e.g. --set data.path=DIR, or one "
                         "stage's: --set stages.NAME.train.epochs=3 (repeatable)")
    once = tr.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true",
                      help="continue the run in --run-dir from its latest checkpoint (an "
                           "error if it has none)")
    once.add_argument("--auto-resume", action="store_true",
                    help="resume if --run-dir holds checkpoints, else start (batch scripts)")
    tr.add_argument("--stop-after-epoch", type=int, metavar="N",
                    help="stop (with a checkpoint) once a stage has done N epochs; --resume "
                         "continues")
    tr.add_argument("--stop-stage", metavar="NAME",
                    help="with --stop-after-epoch: only count epochs of this stage")
    tr.set_defaults(func=cmd_train)

    pl = sub.add_parser("plan", help="check a config's stage plan against its data for N "
                                     "ranks and estimate its cost; runs nothing")
    pl.add_argument("config", type=Path, help="TOML config")
    pl.add_argument("--ranks", type=int, required=True, help="world size the job will have")
    pl.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value; stages.NAME.KEY for one stage "
                         "(repeatable)")
    pl.add_argument("--level-cost", metavar="LEVEL=RATIO,...",
                    help="measured epoch time of a level over level 0's, replacing the ideal "
                         "2^-d per level (e.g. 1=0.73,2=0.6)")
    pl.add_argument("--shared-cores", action="store_true",
                    help="all ranks share the same cores (one workstation, an oversubscribed "
                         "node): concurrent stages add up instead of overlapping")
    pl.set_defaults(func=cmd_plan)

    sb = sub.add_parser("submit", help="write a Slurm batch script for a config and sbatch it")
    sb.add_argument("config", type=Path, help="TOML config")
    sb.add_argument("--nodes", type=int, default=1, help="nodes of the job")
    sb.add_argument("--ntasks-per-node", type=int, default=1, help="ranks per node")
    sb.add_argument("--cpus-per-task", type=int, default=1,
                    help="cores per rank (with GPUs, all but one feed its reader processes)")
    sb.add_argument("--gpus-per-node", type=int, default=0,
                    help="GPUs per node; use as many as --ntasks-per-node (one rank per GPU)")
    sb.add_argument("--time", default="01:00:00", help="time limit, e.g. 04:00:00")
    sb.add_argument("--partition", help="default: the cluster's default partition")
    sb.add_argument("--account", help="default: your default account")
    sb.add_argument("--job-name", help="default hpcmr-<config name>")
    sb.add_argument("--run-dir", type=Path, help="default runs/<config name>")
    sb.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="passed on to train (repeatable)")
    sb.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    sb.set_defaults(func=cmd_submit)

    rep = sub.add_parser("report", help="summary table and plot of runs")
    rep.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                     help="run directories (each holds metrics.jsonl)")
    rep.add_argument("--out", type=Path,
                     help="plot file: .png, .pdf, .svg, ... (default: report.png in the first "
                          "RUN_DIR)")
    rep.set_defaults(func=cmd_report)
    return p


def _say(text: str) -> None:
    """Print on rank 0 only."""
    if rank_and_size()[0] == 0:
        print(text, flush=True)


def _abort_job(code: int) -> None:
    """End every rank of an MPI job now, so that none waits forever in a collective."""
    mpi = running_mpi()
    if mpi is not None and mpi.Get_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        # The launcher forwards each rank's output through a pipe and stops reading it
        # once an abort is under way: on a busy node the error line just printed could be
        # lost. A moment's pause lets it reach the user before the job is torn down.
        time.sleep(float(os.environ.get("HPC_MULTIRES_ABORT_DRAIN_S", "1")))
        mpi.Abort(code)


def fail(message: str | None, code: int, all_ranks: bool) -> int:
    if ("mpi4py.MPI" not in sys.modules and rank_and_size()[1] > 1
            and "MASTER_ADDR" not in os.environ):  # torchrun-style: the others may not start MPI
        # The error came before the ranks had talked (a config or command-line mistake,
        # which every rank makes): start MPI now, so that rank 0 can end the job with one
        # message and one abort instead of every rank printing after its grace period.
        with contextlib.suppress(Exception):
            mpi_world()
    rank, size = rank_and_size()
    if size > 1 and all_ranks and rank != 0:
        # Rank 0 hit the same error and is aborting the job; give it the time to print
        # the one message the user needs, and speak up only if it did not.
        time.sleep(float(os.environ.get("HPC_MULTIRES_ABORT_GRACE_S", "10")))
    if message is not None:
        where = f"[rank {rank}/{size}] " if size > 1 and (rank != 0 or not all_ranks) else ""
        print(f"hpc-multires: error: {where}{message}", file=sys.stderr, flush=True)
    if size > 1:
        _abort_job(code)
    return code


# How gloo and NCCL say that a collective's partner never answered or went away. When one
# of gloo's operations times out it closes every pair of the context, so the operation that
# surfaces may be another one, failing with "Application timeout caused pair closure".
PEER_LOST = ("Timed out waiting", "Application timeout caused pair closure",
             "Connection closed by peer", "Connection reset by peer",
             "collective operation timeout", "communicator was aborted")


def _lost_peer(e: BaseException) -> str | None:
    """One line for a collective that failed because another rank stalled or died (the
    communication library's own text is a C++ traceback); None for anything else."""
    text = str(e)
    if not isinstance(e, RuntimeError) or not any(p in text for p in PEER_LOST):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    first = first.split("] ", 1)[-1]  # drop the library's source position
    return (f"a collective across ranks failed ({first}): another rank stopped answering or "
            "died, and its own output above says why; if one step, evaluation or checkpoint "
            "legitimately takes longer than comm.timeout_s, raise it")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    failure: tuple[str | None, int, bool]
    try:
        return int(args.func(args))
    except UserError as e:
        failure = (str(e), 2, e.all_ranks)
    except Preempted as e:
        # Every rank stops here together: a clean exit, no MPI abort.
        if rank_and_size()[0] == 0:
            print(f"hpc-multires: {e}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except BrokenPipeError:
        # The reader of our output went away (`... | head`): end quietly, as Unix tools
        # do, and keep Python from failing again when it flushes stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return fail(None, 141, all_ranks=False) if rank_and_size()[1] > 1 else 141
    except KeyboardInterrupt:
        failure = ("interrupted", 130, False)
    except Exception as e:
        lost = _lost_peer(e)
        if lost is None:
            traceback.print_exc()
        failure = (lost, 1, False)
    # Out of the except clause the traceback is gone, and with it the frames that held the
    # failed epoch's reader: collected now, it ends its reader processes before the abort,
    # rather than leaving them to find out on their own that this process is gone.
    gc.collect()
    return fail(*failure)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m diffusers_ext.lab train {dit,unet,classifier} --out DIR [--minutes M] [--resume] [--extend-to STEP]`;
`python -m diffusers_ext.lab statistics [--runs lab_runs]` (the data's FID statistics, kept for export);
`python -m diffusers_ext.lab export [--runs lab_runs] [--to diffusers_ext/assets/glyphs]`."""

from __future__ import annotations

import argparse

import torch

from ..argtypes import positive_float, positive_int
from .train import DEFAULTS, KINDS, train, with_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_ext.lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train", help="train one lab II model into --out, checkpointing (resumable)")
    run.add_argument("kind", choices=KINDS)
    run.add_argument("--out", required=True, help="run folder: checkpoint.pt, weights.safetensors, record.json")
    run.add_argument("--minutes", type=positive_float, default=None, help="stop this call after M minutes (default: to the end)")
    run.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    run.add_argument("--steps", type=positive_int, default=None, help="schedule length (a new run only; default per kind)")
    run.add_argument("--extend-to", type=positive_int, default=None, metavar="STEP",
                     help="continue the run in --out past its schedule: a warm restart (warm-up, then cosine) "
                          "from the step it reached to STEP (implies --resume)")
    run.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1: share the CPU)")
    export = sub.add_parser("export", help="write the shipped lab II folder from finished runs (weights, FID statistics)")
    export.add_argument("--runs", default="lab_runs", help="folder of the dit / unet / classifier runs (default: %(default)s)")
    export.add_argument("--to", default=None, help="the shipped folder (default: diffusers_ext/assets/glyphs)")
    stats = sub.add_parser("statistics", help="compute the glyph data's FID reference statistics into --runs "
                                               "(export reuses them; about 6 min on 2 cores)")
    stats.add_argument("--runs", default="lab_runs", help="folder of the runs (default: %(default)s)")
    stats.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1: share the CPU)")
    args = parser.parse_args(argv)
    if args.command == "statistics":
        from pathlib import Path

        from .pipelines import STATISTICS_FILE, data_statistics

        torch.set_num_threads(args.threads)
        try:
            print(f"FID reference statistics: {data_statistics(Path(args.runs) / STATISTICS_FILE)}")
        except OSError as err:
            parser.exit(2, f"python -m diffusers_ext.lab statistics: error: {err}\n")
        return 0
    if args.command == "export":
        from .pipelines import ASSETS, export as export_models

        try:
            export_models(args.runs, args.to or ASSETS)
        except (OSError, ValueError) as err:
            parser.exit(2, f"python -m diffusers_ext.lab export: error: {err}\n")
        return 0
    torch.set_num_threads(args.threads)
    config = with_config(args.kind, steps=args.steps) if args.steps else DEFAULTS[args.kind]
    try:
        train(args.kind, args.out, minutes=args.minutes, resume=args.resume or args.extend_to is not None,
              config=config, extend_to=args.extend_to, log=lambda line: print(line, flush=True))
    except (OSError, ValueError) as err:
        parser.exit(2, f"python -m diffusers_ext.lab train: error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does a patched class-conditional SiT keep the class? Step by step along the stock model's own guided
sampling run: the relative error of the patched model's conditional velocity v_c, of its null-class
velocity v_u and of their difference v_c - v_u, the class direction that classifier-free guidance
multiplies by its scale (docs/lab.md, "Lab II: why the fine-tune did not help").

    python benchmarks/class_direction.py mediator --option mediators=64 --weights [NAME=]DIR ...

Rows: the method training-free with `--option`s, then one row per `--weights` folder (a fine-tune
of the method; its options are the folder's), named NAME or by its path. Model: the shipped glyph SiT
(`--models` for an export). The run: one sample of each of the 36 classes from the same noise, Euler on
the SiT scheduler's `--steps`-step grid (t = 0 noise to t = 1 data) at `--guidance`, the stock model's
states; at each step every row's v_c and v_u on the stock state (`SiTPipeline.velocity`, unguided). Relative error: ||patched - stock|| / ||stock|| over the batch.
Writes benchmarks/results/class_direction.md / .json.
"""

from __future__ import annotations

import argparse
import os

import torch

import diffusers_ext as dx
import harness
from diffusers_ext.argtypes import positive_float, positive_int
from diffusers_ext.errors import OptionError
from diffusers_ext.registry import get_method, parse_options
from diffusers_ext.weights import read_config


def branches(pipe, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_c, v_u): the pipeline's unguided velocity of each sample's class (sample i is of class i) and
    of the null class at (x, t)."""
    labels = torch.arange(len(x))
    null = torch.full_like(labels, pipe.num_classes)
    return pipe.velocity(x, t, labels, 1.0, None), pipe.velocity(x, t, null, 1.0, None)


@torch.no_grad()
def stock_states(pipe, steps: int, guidance: float, seed: int) -> list[tuple]:
    """(x, t, v_c, v_u) at every step of the stock pipeline's guided Euler run, one sample per class."""
    config = pipe.transformer.config
    x = torch.randn(pipe.num_classes, config.in_channels, config.sample_size, config.sample_size,
                    generator=torch.Generator().manual_seed(seed))
    pipe.scheduler.set_timesteps(steps, "ode-euler")
    grid = pipe.scheduler.grid.tolist()
    states = []
    for t, t_next in zip(grid[:-1], grid[1:]):
        v_c, v_u = branches(pipe, x, t)
        states.append((x, t, v_c, v_u))
        x = x + (t_next - t) * (v_u + guidance * (v_c - v_u))
    return states


@torch.no_grad()
def errors(pipe, states) -> list[dict]:
    def relative(a, b):
        return float((a - b).norm() / b.norm())

    rows = []
    for x, t, v_c, v_u in states:
        p_c, p_u = branches(pipe, x, t)
        rows.append(dict(t=t, v_c=relative(p_c, v_c), v_u=relative(p_u, v_u),
                         direction=relative(p_c - p_u, v_c - v_u)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("method", help="the method, e.g. mediator")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="an option of the training-free row (repeatable)")
    parser.add_argument("--weights", nargs="*", default=[], metavar="[NAME=]DIR",
                        help="fine-tuned weights folders of the method, each optionally named")
    parser.add_argument("--models", default=None, help="exported glyph models folder (default: the shipped ones)")
    parser.add_argument("--steps", type=positive_int, default=12)
    parser.add_argument("--guidance", type=positive_float, default=4.0)
    parser.add_argument("--seed", type=int, default=1)
    harness.add_output_argument(parser, harness.RESULTS / "class_direction")
    args = parser.parse_args(argv)
    try:                                                      # bad input fails here, before any model loads
        get_method(args.method)
        options = parse_options(args.option, args.method)
        folders = dict(w.split("=", 1) if "=" in w else (w, w) for w in args.weights)   # name -> folder
        methods = {folder: read_config(folder)["method"] for folder in folders.values()}
    except (OptionError, FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    for folder, method in methods.items():
        if method != args.method:
            parser.error(f"--weights {folder} holds a fine-tune of {method!r}, not of {args.method!r}")

    from diffusers_ext.lab import pipelines as lab

    torch.set_num_threads(os.cpu_count() or 1)
    states = stock_states(lab.glyph_sit_pipeline(args.models), args.steps, args.guidance, args.seed)
    direction_size = [float((v_c - v_u).norm() / v_c.norm()) for _, _, v_c, v_u in states]
    results = {}
    rows = [("training-free", dict(options))] + [(name, dict(weights=folder)) for name, folder in folders.items()]
    for name, kwargs in rows:
        pipe = lab.glyph_sit_pipeline(args.models)
        dx.patch(pipe, args.method, **kwargs)
        results[name] = errors(pipe, states)
        print(name, " ".join(f"{r['direction']:.3f}" for r in results[name]), flush=True)

    stem = harness.output_stem(args)
    harness.write_json(stem.with_name(stem.name + ".json"), dict(
        command=harness.command(__file__, argv), method=args.method, options=options, steps=args.steps,
        guidance=args.guidance, direction_size=direction_size, rows=results))
    columns = ["t", "norm(v_c - v_u) / norm(v_c)"] + [f"{name}: v_c / v_u / direction" for name in results]
    table = [[f"{s[1]:.2f}", f"{direction_size[i]:.3f}"]
             + [f"{r[i]['v_c']:.3f} / {r[i]['v_u']:.3f} / {r[i]['direction']:.3f}" for r in results.values()]
             for i, s in enumerate(states)]
    lines = harness.header(f"The class direction kept by {args.method} on the glyph SiT", __file__, argv=argv,
                           device="cpu", dtype=torch.float32, extra=[
                               f"The stock model's guided Euler run ({args.steps} steps, guidance {args.guidance}, "
                               "one sample of each class); relative errors of the patched model's conditional "
                               "velocity, null-class velocity and their difference on the stock states."])
    text = "\n".join(lines + [""] + harness.markdown_table(columns, table)) + "\n"
    harness.write_atomic(stem.with_suffix(".md"), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

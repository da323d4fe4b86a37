"""What FAAC's training-based anchor frame buys over the training-free one, on a synthetic video set.

    python benchmarks/anchor_training.py --threads 1          # the table in docs/anchor_frame.md, minutes
    python benchmarks/anchor_training.py --quick              # smoke test, seconds

The tiny random-weight AnimateDiff pipeline (diffusers_ext.testing) and synthetic clips made in code
(one shape per clip moving, turning and scaling: pipelines/animatediff_anchor/synthetic.py): a
training set and a held-out set drawn with another seed; the random VAE's scaling factor is set to
1 / std of the training latents (how SD's 0.18215 was chosen), so the clips are not lost under the
noise. The motion modules train with `MotionTrainer` (the anchor through the image model only, loss
on the other frames), without and with the anchor-frame attention during training. Each
configuration then generates videos (the held-out captions, one seed per video, DDIM, no guidance)
and the table gives, on latents (the tiny VAE is random, so pixels say nothing more):

    identity     mean cosine similarity of every non-anchor frame's latent to the anchor's (higher: closer)
    smoothness   mean ||z[f+1] - z[f]||^2 / mean ||z[f]||^2 over the frames (lower: smoother)
    held-out loss  the non-anchor noise-prediction loss on held-out clips (fixed batches)

for videos generated from noise and for the x0 predicted in one step from the held-out clips noised
at t = 100, 300, 500 (where the random image model gives the motion modules real structure to keep),
and the same two figures for the held-out clips themselves (what real motion looks like).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

import harness


def video_metrics(latents: torch.Tensor, anchor: int = 0) -> tuple[float, float]:
    """(identity, smoothness) of videos (N, C, F, h, w), averaged over the videos."""
    frames = latents.flatten(3).transpose(1, 2).flatten(2).double()       # (N, F, C*h*w)
    others = [f for f in range(frames.shape[1]) if f != anchor]
    identity = torch.nn.functional.cosine_similarity(frames[:, others], frames[:, anchor:anchor + 1], dim=-1)
    steps = (frames[:, 1:] - frames[:, :-1]).pow(2).sum(-1).mean(1) / frames.pow(2).sum(-1).mean(1)
    return float(identity.mean()), float(steps.mean())


def generate(pipe, prompts, args, adapter=None, anchor: bool = True) -> torch.Tensor:
    from diffusers_ext.pipelines import animatediff_anchor as faac

    videos = []
    for seed, prompt in enumerate(prompts):
        kwargs = dict(num_frames=args.frames, num_inference_steps=args.sample_steps, guidance_scale=1.0,
                      height=args.resolution, width=args.resolution, output_type="latent",
                      generator=torch.Generator().manual_seed(seed))
        if anchor:
            videos.append(faac.animate(pipe, prompt, motion_adapter=adapter, **kwargs).frames)
        else:
            with faac.motion_adapter_loaded(pipe, adapter) if adapter else torch.no_grad():
                videos.append(pipe(prompt, **kwargs).frames)
    return torch.cat(videos)


@torch.no_grad()
def one_step(pipe, clips, anchor: bool, adapter=None, timesteps=(100, 300, 500)) -> torch.Tensor:
    """x0 predicted in one step from the held-out clips noised at each timestep (same noise for every
    configuration), with the anchor frame (patch `anchor_frame`) or without; (len(ts) * N, C, F, h, w)."""
    import contextlib

    from diffusers import DDPMScheduler

    import diffusers_ext as dx
    from diffusers_ext.pipelines import animatediff_anchor as faac

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    x0, frames = clips.latents, clips.latents.shape[2]
    embeds = pipe.encode_prompt(clips.captions, "cpu", 1, False)[0].repeat_interleave(frames, 0)
    generator = torch.Generator().manual_seed(0)
    predictions = []
    with contextlib.ExitStack() as stack:
        if adapter is not None:
            stack.enter_context(faac.motion_adapter_loaded(pipe, adapter))
        if anchor:
            stack.enter_context(dx.patched(pipe, "anchor_frame"))
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=generator)
            xt = scheduler.add_noise(x0, noise, torch.tensor([t]))
            eps = pipe.unet(xt, t, encoder_hidden_states=embeds).sample
            abar = scheduler.alphas_cumprod[t]
            predictions.append((xt - (1 - abar).sqrt() * eps) / abar.sqrt())
    return torch.cat(predictions)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=12, help="training clips (videos)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=16, help="pixels (the tiny VAE halves it)")
    parser.add_argument("--steps", type=int, default=400, help="training steps per configuration")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sample-steps", type=int, default=10, help="denoising steps of each generated video")
    parser.add_argument("--samples", type=int, default=6, help="generated videos per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    harness.add_quick_argument(parser, "4 videos, 4 frames, 3 steps, 2 samples")
    harness.add_output_argument(parser, harness.RESULTS / "anchor_training.md")
    args = parser.parse_args(argv)
    harness.apply_quick(parser, args, videos=4, frames=4, steps=3, samples=2, sample_steps=2)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers_ext.pipelines import animatediff_anchor as faac
    from diffusers_ext.pipelines.animatediff_anchor.synthetic import write_synthetic_videos
    from diffusers_ext.testing import tiny_pipeline

    base = tiny_pipeline("animatediff")
    root = Path(tempfile.mkdtemp(prefix="anchor_training_"))
    write_synthetic_videos(root / "train", count=args.videos, frames=args.frames, size=3 * args.resolution, seed=0)
    write_synthetic_videos(root / "held_out", count=max(2, args.samples), frames=args.frames,
                           size=3 * args.resolution, seed=1)
    side = dict(frames=args.frames, height=args.resolution, width=args.resolution)
    # the random VAE's latents are far from unit scale: set its scaling factor to 1 / std of the
    # training latents, as SD's 0.18215 was chosen, so the clips are not lost under the noise
    base.vae.register_to_config(scaling_factor=1.0)
    scale = 1.0 / float(faac.load_clips(base.vae, root / "train", **side).latents.std())
    base.vae.register_to_config(scaling_factor=scale)
    held_out = faac.load_clips(base.vae, root / "held_out", **side)
    prompts = [held_out.captions[i % len(held_out)] for i in range(args.samples)]

    def trainer(name, **kwargs):
        config = faac.MotionTrainConfig(output_dir=str(root / name), frames=args.frames, resolution=args.resolution,
                                        batch_size=args.batch_size, max_steps=args.steps, lr=args.lr, cpu=True,
                                        progress=False, cache_dir=str(root / "cache"), **kwargs)
        return faac.MotionTrainer(copy.deepcopy(base), root / "train", config)

    def held_out_loss(run) -> str:
        return " / ".join(f"{run.evaluate(held_out, anchor_attention=a):.4f}" for a in (False, True))

    clip_metrics = video_metrics(held_out.latents)
    rows = [("held-out clips (real motion)", "-", *clip_metrics, *clip_metrics, "-")]
    stock = trainer("stock")          # nothing trains: the held-out loss of the stock motion modules
    rows.append(("stock AnimateDiff (no anchor)", "-", *video_metrics(generate(base, prompts, args, anchor=False)),
                 *video_metrics(one_step(base, held_out, anchor=False)), "-"))
    rows.append(("training-free anchor (stock motion modules)", "-",
                 *video_metrics(generate(base, prompts, args)), *video_metrics(one_step(base, held_out, anchor=True)),
                 held_out_loss(stock)))
    for name, label, kwargs in (("trained", "trained: ghost motion modules", {}),
                                ("trained-attention", "trained: ghost motion + anchor attention",
                                 {"anchor_attention": True})):
        run = trainer(name, **kwargs)
        result = run.train(evaluate=False)
        metrics = video_metrics(generate(base, prompts, args, adapter=result.output_dir))
        denoised = video_metrics(one_step(base, held_out, anchor=True, adapter=result.output_dir))
        rows.append((f"{label} (anchor at inference)", f"{result.steps}", *metrics, *denoised, held_out_loss(run)))

    table = [(r[0], r[1], *(f"{v:.3f}" for v in r[2:6]), r[6]) for r in rows]
    lines = harness.header(
        "FAAC training-based anchor frame on synthetic videos (tiny AnimateDiff)", __file__, argv=argv,
        extra=[f"{args.videos} training clips, {len(held_out)} held-out clips, {args.frames} frames at "
               f"{args.resolution}^2 px; {args.steps} steps of batch {args.batch_size}, lr {args.lr}; "
               f"{args.samples} generated videos per row ({args.sample_steps} DDIM steps, guidance 1, anchor 0); "
               f"VAE scaling factor 1 / std of the training latents = {scale:.3f}. "
               "identity: cosine of non-anchor frames to the anchor (latents); smoothness: relative "
               "frame-to-frame squared difference; generated: sampled from noise; one-step: x0 predicted "
               "from the held-out clips noised at t = 100, 300, 500; held-out loss: non-anchor loss without / "
               "with the anchor attention."])
    lines += harness.markdown_table(["configuration", "train steps", "generated identity", "generated smoothness",
                                     "one-step identity", "one-step smoothness",
                                     "held-out loss (ghost / + attention)"], table)
    path = harness.write_atomic(harness.output_path(args, ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""DDIM inversion of the anchor frame with the image model: a photo -> the noise DDIM turns back into it."""

from __future__ import annotations

import torch

from .hooks import check_pipeline, image_model


def alphas(scheduler, t: int, num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_bar at t, alpha_bar at the DDIM step before t), exactly as DDIMScheduler.step pairs them."""
    previous = t - scheduler.config.num_train_timesteps // num_inference_steps
    alpha_t = scheduler.alphas_cumprod[t]
    alpha_prev = scheduler.alphas_cumprod[previous] if previous >= 0 else scheduler.final_alpha_cumprod
    return alpha_t, alpha_prev


def encode_image(pipe, image, height: int | None = None, width: int | None = None, generator=None) -> torch.Tensor:
    """A PIL image / array / tensor -> VAE latent (1, C, h, w), scaled as the UNet expects."""
    from diffusers.image_processor import VaeImageProcessor

    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pixels = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor).preprocess(image, height, width)
    pixels = pixels.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
    with torch.no_grad():
        latent = pipe.vae.encode(pixels).latent_dist.mean
    return latent * pipe.vae.config.scaling_factor


@torch.no_grad()
def invert(pipe, image=None, prompt: str | None = "", *, latent: torch.Tensor | None = None,
           num_inference_steps: int = 50, guidance_scale: float = 1.0, negative_prompt: str | None = None,
           height: int | None = None, width: int | None = None, refine_steps: int = 0) -> torch.Tensor:
    """DDIM inversion of an image (or a VAE `latent` (1, C, h, w)) with the image model: the noise
    latent (1, C, h, w) that deterministic DDIM sampling (eta = 0) with the same prompt, guidance and
    step count turns back into the image's latent.

    Each step runs the DDIM update backwards, x_t = sqrt(a_t) x0(eps) + sqrt(1 - a_t) eps with
    eps = eps(x_prev, t) (the usual approximation of eps(x_t, t)); `refine_steps` > 0 re-evaluates
    eps at the current estimate of x_t that many times (a fixed-point iteration, closer round trip at
    that many extra UNet calls per step). The pipeline's scheduler must be a DDIMScheduler.
    """
    from diffusers import DDIMScheduler

    check_pipeline(pipe)
    scheduler = pipe.scheduler
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(f"DDIM inversion needs pipe.scheduler to be a DDIMScheduler, got {type(scheduler).__name__}; "
                        "set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
    if latent is None:
        if image is None:
            raise ValueError("invert needs an `image` or a `latent`")
        latent = encode_image(pipe, image, height, width)
    device = pipe.unet.device
    latent = latent.to(device=device, dtype=pipe.unet.dtype)
    cfg = guidance_scale > 1.0
    embeds, negative = pipe.encode_prompt(prompt, device, latent.shape[0], cfg, negative_prompt)
    embeds = torch.cat([negative, embeds]) if cfg else embeds

    def eps(x: torch.Tensor, t) -> torch.Tensor:
        x_in = torch.cat([x, x]) if cfg else x
        noise = pipe.unet(x_in[:, :, None], t, encoder_hidden_states=embeds).sample[:, :, 0]
        if cfg:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        return noise

    scheduler.set_timesteps(num_inference_steps, device=device)
    x = latent
    with image_model(pipe), pipe.progress_bar(total=num_inference_steps) as progress:
        for t in scheduler.timesteps.flip(0):
            alpha_t, alpha_prev = (a.to(device=device, dtype=torch.float32) for a in alphas(scheduler, int(t), num_inference_steps))
            x_prev = x.float()
            x0_of = lambda e: (x_prev - (1 - alpha_prev).sqrt() * e) / alpha_prev.sqrt()  # noqa: E731
            noise = eps(x, t).float()
            x_t = alpha_t.sqrt() * x0_of(noise) + (1 - alpha_t).sqrt() * noise
            for _ in range(refine_steps):
                noise = eps(x_t.to(latent.dtype), t).float()
                x_t = alpha_t.sqrt() * x0_of(noise) + (1 - alpha_t).sqrt() * noise
            x = x_t.to(latent.dtype)
            progress.update()
    return x

"""FAAC anchor-frame video generation on diffusers' AnimateDiff pipelines (Li et al., 2023).

One frame of the video, the anchor, is denoised by the text-to-image model alone: the motion modules
leave it unchanged ("ghost" motion modules), so it keeps the personalised model's identity and
detail. Every other frame's spatial self-attention also reads the anchor's keys and values, so
identity and detail propagate from it. Both are the method `dx.patch(pipe, "anchor_frame")`
(`processors/anchor_frame.py`). The anchor may start from the DDIM inversion of a user's photo, so a
real face can be animated with its identity kept; a ControlNet / SparseControlNet driving signal
(face landmarks, a rendered 3D face model) steers expression and pose of the other frames.

    from diffusers_ext.pipelines.animatediff_anchor import animate
    out = animate(pipe, "a portrait", image=photo, num_frames=16, output="face.gif")

    with dx.patched(pipe, "anchor_frame", anchor=0, mode="concat"):     # or anchor_frame(pipe, ...)
        frames = pipe("a portrait", num_frames=16).frames

Works on `AnimateDiffPipeline`, `AnimateDiffControlNetPipeline` and
`AnimateDiffSparseControlNetPipeline` (anything with a `UNetMotionModel` as `pipe.unet`).

    hooks.py      the image model inside a motion UNet: MotionBypass, ControlAnchorMask, image_model_unet
    inversion.py  DDIM inversion of the anchor frame (encode_image, invert)
    runner.py     animate, and the wrappers enable_anchor_frame / disable_anchor_frame / anchor_frame
    export.py     save_video (.gif / .mp4)
    training.py   the training-based variant: MotionTrainer / train_motion (motion modules fine-tuned on
                  videos, the anchor through the image model only), non_anchor_loss
    videos.py     training clips from videos (.gif / .mp4 / .webm / frame folders), latents cached on disk
    adapter.py    motion adapters out (save_motion_adapter) and in (motion_adapter_loaded)
    synthetic.py  a synthetic video set made in code (moving, turning, scaling shapes)
"""

from .adapter import motion_adapter_loaded, motion_adapter_of, save_motion_adapter
from .export import save_video, to_pil
from .hooks import ControlAnchorMask, MotionBypass, check_pipeline, image_model, image_model_unet, motion_modules
from .inversion import alphas, encode_image, invert
from .runner import anchor_frame, animate, disable_anchor_frame, enable_anchor_frame
from .training import MotionTrainConfig, MotionTrainer, MotionTrainResult, non_anchor_loss, train_motion
from .videos import VideoClips, load_clips

__all__ = [
    "ControlAnchorMask", "MotionBypass", "MotionTrainConfig", "MotionTrainResult", "MotionTrainer", "VideoClips",
    "alphas", "anchor_frame", "animate", "check_pipeline", "disable_anchor_frame", "enable_anchor_frame",
    "encode_image", "image_model", "image_model_unet", "invert", "load_clips", "motion_adapter_loaded",
    "motion_adapter_of", "motion_modules", "non_anchor_loss", "save_motion_adapter", "save_video", "to_pil",
    "train_motion",
]

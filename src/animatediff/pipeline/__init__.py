"""Text-to-video sampling: prompt encoding, latents, the denoising loop, decoding."""

from .pipeline import AnimationPipeline
from .schedulers import SCHEDULERS, make_scheduler

__all__ = ["SCHEDULERS", "AnimationPipeline", "make_scheduler"]

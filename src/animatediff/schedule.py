"""AnimateDiff's noise schedule, the one every sampler and every training stage starts from.

The motion modules were trained with `linear` betas (0.00085 -> 0.012), not SD's
`scaled_linear`; the official inference uses DDIM on them with `steps_offset=1` and
`clip_sample=False`. Kept here, at the bottom of the package, as plain data: the pipeline, the
trainer and the model builders all read it.
"""

from __future__ import annotations

ANIMATEDIFF_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="linear",
    steps_offset=1,
    clip_sample=False,
)

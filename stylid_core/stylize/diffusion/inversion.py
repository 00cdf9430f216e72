"""Deterministic DDIM (eta = 0): the schedule, the inversion and the sampling step, with the prediction types.

Written against ``alphas_cumprod`` of the checkpoint's scheduler so the inversion and the sampling use exactly the
same pairs of noise levels: sampling step ``i`` goes from timestep ``t_i`` (alpha ``a_t``) to ``t_i - ratio``
(alpha ``a_prev``; the scheduler's final alpha below 0), and inversion runs the same pairs backwards. The UNet is
evaluated at timestep ``t_i`` in both directions (in the inversion on the less noisy latent), which is where
StyleID records the features it injects at ``t_i``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class DDIMSchedule:
    """Timesteps (descending, sampling order) and the alpha pair of each sampling step."""

    timesteps: list[int]
    alpha_t: list[float]
    alpha_prev: list[float]
    prediction_type: str

    @classmethod
    def from_scheduler(cls, scheduler, steps: int) -> DDIMSchedule:
        scheduler.set_timesteps(steps)
        timesteps = [int(t) for t in scheduler.timesteps]
        ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alphas = scheduler.alphas_cumprod
        final = float(scheduler.final_alpha_cumprod)
        alpha_t = [float(alphas[t]) for t in timesteps]
        alpha_prev = [float(alphas[t - ratio]) if t - ratio >= 0 else final for t in timesteps]
        return cls(timesteps, alpha_t, alpha_prev, scheduler.config.prediction_type)

    def __len__(self) -> int:
        return len(self.timesteps)

    def subsample(self, stride: int) -> DDIMSchedule:
        """Every ``stride``-th timestep from the first (noisiest), each step going to the next kept timestep."""
        keep = list(range(0, len(self.timesteps), stride))
        alpha_t = [self.alpha_t[i] for i in keep]
        return DDIMSchedule(
            [self.timesteps[i] for i in keep], alpha_t, alpha_t[1:] + [self.alpha_prev[-1]], self.prediction_type
        )

    def eps_and_x0(
        self, output: torch.Tensor, sample: torch.Tensor, alpha: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and clean-latent predictions from a UNet output at noise level ``alpha``."""
        sa, sb = alpha**0.5, (1 - alpha) ** 0.5
        if self.prediction_type == "epsilon":
            return output, (sample - sb * output) / sa
        if self.prediction_type == "v_prediction":
            return sa * output + sb * sample, sa * sample - sb * output
        if self.prediction_type == "sample":
            return (sample - sa * output) / sb, output
        raise ValueError(f"unsupported scheduler prediction_type {self.prediction_type!r}")


def ddim_move(x0: torch.Tensor, eps: torch.Tensor, alpha: float) -> torch.Tensor:
    """The latent at noise level ``alpha`` with clean part ``x0`` and noise ``eps``."""
    return alpha**0.5 * x0 + (1 - alpha) ** 0.5 * eps


UNetCall = Callable[[torch.Tensor, int], torch.Tensor]


@torch.no_grad()
def ddim_invert(
    unet_call: UNetCall,
    latents: torch.Tensor,
    schedule: DDIMSchedule,
    before_step: Callable[[int, int], None] | None = None,
) -> dict[int, torch.Tensor]:
    """DDIM-invert clean latents; returns ``{t: z_t}`` for every timestep plus ``{-1: z_0}``.

    ``before_step(index, t)`` runs before each UNet call (the engine sets the recording timestep there);
    ``index`` is the sampling-order index of ``t``.
    """
    trajectory = {-1: latents}
    x = latents.float()
    n = len(schedule)
    for index in reversed(range(n)):
        t = schedule.timesteps[index]
        if before_step is not None:
            before_step(index, t)
        output = unet_call(x, t).float()
        # the UNet sees the latent at a_prev but is told t: read its noise at a_t, then undo the a_prev mixing
        eps, _ = schedule.eps_and_x0(output, x, schedule.alpha_t[index])
        a_prev = schedule.alpha_prev[index]
        x0 = (x - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
        x = ddim_move(x0, eps, schedule.alpha_t[index])
        trajectory[t] = x
    return trajectory

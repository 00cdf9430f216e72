"""``landmark_steps_end``: the landmark branch runs on the first fraction of the denoising steps only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stylid_core.config import ConfigError
from stylid_core.customize import CUSTOMIZERS
from stylid_core.customize.facesnap.components import tiny_components
from stylid_core.customize.facesnap.config import FaceSnapConfig
from stylid_core.customize.facesnap.engine import FaceSnapEngine, landmark_branch_steps, tiny_model_config
from stylid_core.customize.facesnap.modules import FaceSnapModules

STEPS = 4


@pytest.fixture()
def engine():
    comps = tiny_components()
    torch.manual_seed(0)
    modules = FaceSnapModules(tiny_model_config(comps), comps.unet)
    with torch.no_grad():  # make the zero-initialised parts (the ControlNet's zero convolutions) non-trivial
        for p in modules.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return FaceSnapEngine(comps, modules)


class Spy:
    """Counts the ControlNet's forward calls (and their timesteps); optionally drops the landmark map after a step."""

    def __init__(self, engine: FaceSnapEngine, drop_map_from_call: int | None = None) -> None:
        self.timesteps, self.maps_seen, self.calls = [], [], 0
        identity = engine.modules.identity
        self.handle = identity.controlnet.register_forward_hook(
            lambda m, args, out: self.timesteps.append(int(args[1]))
        )
        original = identity.predict_noise

        def predict_noise(unet, latents, t, text, tokens=None, landmark_map=None, *rest):
            if drop_map_from_call is not None and self.calls >= drop_map_from_call:
                landmark_map = None  # the branch disabled by hand from this step on
            self.maps_seen.append(landmark_map is not None)
            self.calls += 1
            return original(unet, latents, t, text, tokens, landmark_map, *rest)

        identity.predict_noise = predict_noise
        self._undo = lambda: (self.handle.remove(), delattr(identity, "predict_noise"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._undo()


def _sample(engine: FaceSnapEngine, **kw) -> np.ndarray:
    cond = engine.encode_prompt(["a portrait"]).expand(2, -1, -1)
    uncond = engine.encode_prompt([""])
    tokens = engine.modules.mixer(torch.randn(1, 17, 32, generator=torch.Generator().manual_seed(1)),
                                  torch.ones(1, 128))  # fmt: skip
    lm = torch.rand(1, 68, 2, generator=torch.Generator().manual_seed(2)) * 0.4 + 0.3
    target = engine.modules.predictor(lm, driving_landmarks=lm)[0]
    scale = kw.pop("landmark_scale", 1.0)
    return engine.sample(cond, uncond, tokens, target, 32, STEPS, 5.0, torch.Generator().manual_seed(3),
                         landmark_scale=scale, **kw)  # fmt: skip


def test_branch_step_count_follows_diffusers_control_guidance_end():
    assert [landmark_branch_steps(4, e) for e in (1.0, 0.75, 0.5, 0.4, 0.25, 0.0)] == [4, 3, 2, 1, 1, 0]
    assert landmark_branch_steps(30, 0.5) == 15 and landmark_branch_steps(50, 0.4) == 20
    assert landmark_branch_steps(3, 0.5) == 1  # (i + 1) / n <= end


def test_steps_end_one_runs_the_branch_on_every_step_as_before(engine):
    with Spy(engine) as spy:
        full = _sample(engine, landmark_steps_end=1.0)
    # batch 2 in one chunk: one ControlNet call per step, at every timestep, with the landmark map each time
    assert spy.timesteps == [int(t) for t in engine.scheduler.timesteps] and len(spy.timesteps) == STEPS
    assert spy.maps_seen == [True] * STEPS
    np.testing.assert_array_equal(full, _sample(engine))  # the engine's default is unchanged: every step


def test_steps_end_half_runs_the_branch_on_the_first_half_only(engine):
    full = _sample(engine, landmark_steps_end=1.0)
    with Spy(engine) as spy:
        half = _sample(engine, landmark_steps_end=0.5)
    timesteps = [int(t) for t in engine.scheduler.timesteps]
    assert spy.timesteps == timesteps[: STEPS // 2]  # the ControlNet is not run at all on the rest
    assert spy.maps_seen == [True, True, False, False]
    assert np.abs(half - full).max() > 1e-3  # the late steps' branch mattered, so skipping it is visible
    with Spy(engine, drop_map_from_call=STEPS // 2) as manual:  # every step on, but the map dropped by hand
        by_hand = _sample(engine, landmark_steps_end=1.0)
    assert manual.timesteps == timesteps[: STEPS // 2]
    np.testing.assert_array_equal(half, by_hand)


def test_steps_end_zero_equals_landmark_scale_zero(engine, astronaut, astronaut_face):
    with Spy(engine) as spy:
        none = _sample(engine, landmark_steps_end=0.0)
    assert spy.timesteps == []
    np.testing.assert_array_equal(none, _sample(engine, landmark_scale=0.0))
    # end to end: no landmarks are predicted, the images equal landmark_scale=0's
    kw = dict(num_images=2, seed=4, resolution=32, num_inference_steps=STEPS, guidance_scale=5.0)
    a = engine.generate(astronaut, astronaut_face, "a portrait", landmark_steps_end=0.0, **kw)
    b = engine.generate(astronaut, astronaut_face, "a portrait", landmark_scale=0.0, **kw)
    c = engine.generate(astronaut, astronaut_face, "a portrait", **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


def test_config_default_validation_and_customizer_pass_through(astronaut, astronaut_face):
    assert FaceSnapConfig(tiny={}).landmark_steps_end == 0.4
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="landmark_steps_end"):
            FaceSnapConfig.from_dict({"tiny": {}, "landmark_steps_end": bad})
    for end, calls in ((1.0, STEPS), (0.5, STEPS // 2), (0.0, 0)):
        cfg = {"tiny": {}, "num_inference_steps": STEPS, "guidance_scale": 3.0, "landmark_steps_end": end}
        customizer = CUSTOMIZERS.create("facesnap", config=cfg)
        with Spy(customizer.engine) as spy:
            customizer.generate(astronaut, astronaut_face, "x", num_images=1)
        assert len(spy.timesteps) == calls

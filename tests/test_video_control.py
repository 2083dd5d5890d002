"""Video: a batch of condition frames controls a batch of latent frames one to one, and with AnimateDiff-Evolved's
sliding context windows each window takes its own frames' conditions, from the ``ad_params`` of
``transformer_options`` that AnimateDiff-Evolved passes (as ComfyUI-Advanced-ControlNet's controls read them)."""
import pytest
import torch

from conftest import pack
from helpers import apply, load_condition, sigmas_for
from tiny import conditioning, tiny_model

FRAMES = 6


@pytest.fixture
def video(golden_files):
    condition = load_condition("base.ckpt", "lora0.ckpt")
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(FRAMES, 4, 16, 16, generator=generator)  # one condition latent per frame, all different
    context = torch.randn(1, 7, 32, generator=generator)
    return condition, tiny_model(), frames, context


def _control(condition, model, latent, frames, context, batched_number=1, transformer_options=None):
    """The control for ``frames`` latent frames (x cond/uncond when batched_number is 2), as the sampler asks."""
    positive, _ = apply(conditioning(0), conditioning(1), condition, latent)
    control = positive[0][1]["control"]
    control.pre_run(model.model, lambda p: model.model.model_sampling.percent_to_sigma(p))
    batch = frames * batched_number
    try:
        with torch.no_grad():
            out = control.get_control(torch.zeros(batch, 4, 16, 16), sigmas_for(model, torch.full((batch,), 500)),
                                      {"c_crossattn": context.expand(batch, -1, -1)}, batched_number,
                                      transformer_options or {})
    finally:
        control.cleanup()
    return out["output"] + out["middle"]


def test_each_condition_frame_controls_its_own_latent_frame(video):
    condition, model, frames, context = video
    batch = _control(condition, model, frames, FRAMES, context)
    for i in range(FRAMES):
        alone = _control(condition, model, frames[i:i + 1], 1, context)
        for got, expected in zip(batch, alone):
            torch.testing.assert_close(got[i:i + 1], expected, rtol=1e-4, atol=1e-4)  # fp32, batch of 6 vs 1
    assert (batch[0][0] - batch[0][1]).abs().max() > 1e-3  # the frames really differ


@pytest.mark.parametrize("sub_idxs", [[2, 3, 4], [4, 5, 0]], ids=["window", "wrapped window"])
def test_a_sliding_context_window_takes_its_own_frames(video, sub_idxs):
    condition, model, frames, context = video
    options = {"ad_params": {"sub_idxs": sub_idxs, "full_length": FRAMES, "context_length": len(sub_idxs)}}
    # cfg: cond and uncond of the window's 3 frames in one batch
    window = _control(condition, model, frames, len(sub_idxs), context, batched_number=2, transformer_options=options)
    expected = _control(condition, model, frames[sub_idxs], len(sub_idxs), context, batched_number=2)
    for got, want in zip(window, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # One condition image still serves every window.
    single = _control(condition, model, frames[:1], len(sub_idxs), context, transformer_options=options)
    assert single[0].shape[0] == len(sub_idxs)


def test_condition_frames_that_do_not_match_the_video_are_refused(video):
    condition, model, frames, context = video
    options = {"ad_params": {"sub_idxs": [0, 1, 2], "full_length": 8, "context_length": 3}}
    with pytest.raises(pack.ctrlora_core.CtrLoRAError, match="6 condition frames for 8 latent frames"):
        _control(condition, model, frames, 3, context, transformer_options=options)

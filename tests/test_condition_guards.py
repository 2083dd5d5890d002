"""Guards against the common mistakes with condition latents: a latent that VAE Condition Encode did not make
(e.g. ComfyUI's VAE Encode) runs but warns on Apply CtrLoRA, and how far its control is from the right one is
measured (the page showing it on the node: tests/test_ui.py); a condition of another aspect ratio than the sampled
latent is centre-cropped, never stretched."""
import os

import numpy as np
import torch
from PIL import Image

from helpers import apply, control_outputs, load_condition, nodes, sigmas_for
from tiny import conditioning, tiny_model, tiny_vae

IMAGE = os.path.join(os.path.dirname(__file__), "data", "preprocessors", "inputs", "scene_256x192.png")


def _condition_image(size=32):
    with Image.open(IMAGE) as image:
        pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]


def _control(condition, latent_dict, model, context):
    positive, _ = nodes.ApplyCtrLoRA().apply(conditioning(0), conditioning(1), condition, latent_dict, 1.0, 0.0, 1.0)
    return control_outputs(positive, model, sigmas_for(model, torch.tensor([999, 500])), context)


def _relative(got, expected):
    return (torch.cat([(g - e).flatten() for g, e in zip(got, expected)]).norm()
            / torch.cat([e.flatten() for e in expected]).norm()).item()


def test_a_latent_from_vae_encode_runs_but_warns_and_its_control_is_measurably_off(golden_files, caplog, capsys):
    condition = load_condition("base.ckpt", "lora0.ckpt")
    model, vae, image = tiny_model(), tiny_vae(), _condition_image()
    context = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    (right,) = nodes.VAEConditionEncode().encode(image, vae)
    wrong = {"samples": vae.encode(image)}  # what ComfyUI's VAE Encode node returns
    expected = _control(condition, right, model, context)
    assert not caplog.records
    got = _control(condition, wrong, model, context)
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "Apply CtrLoRA (lora0.ckpt): its condition latent does not come from VAE " \
        "Condition Encode" in record.getMessage() and "[-1, 1]" in record.getMessage()
    latent_distance = _relative([wrong["samples"]], [right["samples"]])
    control_distance = _relative(got, expected)
    with capsys.disabled():
        print(f"\nVAE Encode's latent against VAE Condition Encode's: latent off by {latent_distance:.3f}, control "
              f"by {control_distance:.3f} (relative L2, tiny golden model)")
    assert latent_distance > 0.3 and control_distance > 0.3


def test_a_condition_of_another_aspect_is_centre_cropped_not_stretched(golden_files):
    condition = load_condition("base.ckpt", "lora0.ckpt")
    model = tiny_model()
    context = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    wide = torch.randn(1, 4, 16, 32, generator=torch.Generator().manual_seed(1))
    positive, _ = apply(conditioning(0), conditioning(1), condition, wide)
    got = control_outputs(positive, model, sigmas_for(model, torch.tensor([999, 500])), context)
    positive, _ = apply(conditioning(0), conditioning(1), condition, wide[..., 8:24])
    centre = control_outputs(positive, model, sigmas_for(model, torch.tensor([999, 500])), context)
    for x, y in zip(got, centre):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)

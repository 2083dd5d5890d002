"""Guards against the common mistakes with condition latents: a latent that VAE Condition Encode did not make
(e.g. ComfyUI's VAE Encode) runs but warns on Apply CtrLoRA, and how far its control is from the right one is
measured; a condition of another aspect ratio than the sampled latent is centre-cropped, never stretched."""
import os

import numpy as np
import torch
from PIL import Image

from conftest import pack
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


def test_the_page_shows_the_warning_on_apply_ctrlora_until_the_next_run(tmp_path_factory):
    """In the real page: VAE Encode's latent into Apply CtrLoRA runs, and the node then shows the warning; a run with
    VAE Condition Encode's latent clears it."""
    import shutil

    from test_server import graph
    from tiny import GOLDEN
    from ui_host import comfy_page, running_server

    golden = tmp_path_factory.mktemp("golden")
    for name in ("base.ckpt", "lora0.ckpt"):
        shutil.copy(os.path.join(GOLDEN, name), golden / name)
    models = {"ctrlora": {name: str(golden / name) for name in ("base.ckpt", "lora0.ckpt")}}
    foreign = graph()
    foreign["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 3]}}
    notice = "() => window.app.graph.getNodeById(6)?.widgets?.find((w) => w.name === 'ctrlora_notice')?.value ?? ''"
    with running_server(tmp_path_factory.mktemp("guard_server"), models=models, fixtures=True) as server, \
            comfy_page(server) as comfy:
        comfy.close_dialogs()
        comfy.evaluate("([g, name]) => window.app.loadApiJson(g, name)", [foreign, "vae-encode"])
        entry = server.wait(server.queue(comfy.graph_to_prompt(), client_id=comfy.client_id), 120)
        assert entry["status"]["status_str"] == "success", server.explain(str(entry["status"]))
        comfy.page.wait_for_function(f"() => ({notice})().startsWith('Warning: Apply CtrLoRA (lora0.ckpt)')",
                                     timeout=10_000)
        comfy.screenshot("ui-foreign-latent-warning.png", clip=comfy.fit_view(type_prefix="CtrLoRAApply", padding=60))
        # The next run, with VAE Condition Encode's latent, clears it from the same node and adds nothing.
        entry = server.wait(server.queue(graph(), client_id=comfy.client_id), 120)
        assert entry["status"]["status_str"] == "success", server.explain(str(entry["status"]))
        comfy.page.wait_for_timeout(500)
        assert comfy.evaluate(notice) == ""

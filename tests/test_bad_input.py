"""Bad input: a clear error naming the file or input and what is wrong, and nothing written."""
import hashlib
import os
import pickle

import pytest
import torch

import comfy.cldm.cldm
import comfy.ops

from conftest import pack
from helpers import apply, control_outputs, load_lora, nodes, sigmas_for, write_lora
from tiny import GOLDEN, TINY_UNET, conditioning, fill_, tiny_model, tiny_vae
from training_helpers import config, golden_base, trainer, write_pairs, write_prompt_json

core = pack.ctrlora_core
Error = core.CtrLoRAError


def _controlnet_sd(model_channels=32):
    """A plain ControlNet (with input_hint_block) of the tiny layout, keys as in official .pth files."""
    config = {k: v for k, v in TINY_UNET.items() if k not in ("out_channels", "transformer_depth_output",
                                                                "use_temporal_attention", "use_temporal_resblock")}
    config["model_channels"] = model_channels
    net = fill_(comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **config), 0)
    return {"control_model." + k: v for k, v in net.state_dict().items()}


def _folder_snapshot(folder):
    return sorted((p.name, p.stat().st_size) for p in folder.iterdir())


@pytest.fixture
def folder(golden_files):
    return golden_files


def _expect(folder, error, match, call):
    before = _folder_snapshot(folder)
    with pytest.raises(error, match=match):
        call()
    assert _folder_snapshot(folder) == before


def test_missing_file(folder):
    _expect(folder, FileNotFoundError, "'nope.ckpt' is not in models/ctrlora/ or models/controlnet/",
            lambda: nodes.LoadBaseControlNet().load("nope.ckpt"))
    _expect(folder, Error, "nope.safetensors: file not found", lambda: core.load_base(str(folder / "nope.safetensors")))


def test_name_cannot_escape_the_models_folder(folder):
    (folder.parent / "outside.ckpt").write_bytes((folder / "base.ckpt").read_bytes())
    _expect(folder, FileNotFoundError, "is not in models/ctrlora/",
            lambda: nodes.LoadBaseControlNet().load("../outside.ckpt"))


def test_empty_file(folder):
    (folder / "empty.ckpt").touch()
    _expect(folder, Error, "empty.ckpt: the file is empty", lambda: nodes.LoadBaseControlNet().load("empty.ckpt"))


@pytest.mark.parametrize("name,content", [
    ("garbage.ckpt", os.urandom(4096)),
    ("garbage.safetensors", os.urandom(4096)),
])
def test_corrupt_file(folder, name, content):
    (folder / name).write_bytes(content)
    _expect(folder, Error, f"{name}: could not be read", lambda: nodes.LoadBaseControlNet().load(name))


def test_truncated_file(folder):
    data = (folder / "base.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    _expect(folder, Error, "truncated.ckpt: could not be read", lambda: nodes.LoadBaseControlNet().load("truncated.ckpt"))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_not_run(folder, tmp_path):
    marker = tmp_path / "payload_ran"
    with open(folder / "evil.ckpt", "wb") as f:
        torch.save({"weight": torch.zeros(1), "payload": _Payload(str(marker))}, f)
    _expect(folder, Error, "evil.ckpt: refused to load.*could run code", lambda: nodes.LoadBaseControlNet().load("evil.ckpt"))
    assert not marker.exists()


def test_plain_controlnet_as_base(folder):
    torch.save(_controlnet_sd(), folder / "control_canny.pth")
    _expect(folder, Error, "control_canny.pth is a regular ControlNet .*'Load ControlNet Model'",
            lambda: nodes.LoadBaseControlNet().load("control_canny.pth"))


def test_lora_as_base_and_base_as_lora(folder):
    _expect(folder, Error, "lora0.ckpt is a CtrLoRA condition LoRA, not a base.*'Load CtrLoRA'",
            lambda: nodes.LoadBaseControlNet().load("lora0.ckpt"))
    (base,) = nodes.LoadBaseControlNet().load("base.ckpt")
    _expect(folder, Error, "base.ckpt is a CtrLoRA base ControlNet, not a condition LoRA.*'Load Base ControlNet'",
            lambda: nodes.LoadCtrLoRA().load(base, "base.ckpt"))
    torch.save(_controlnet_sd(), folder / "control_depth.pth")
    _expect(folder, Error, "control_depth.pth is a regular ControlNet",
            lambda: nodes.LoadCtrLoRA().load(base, "control_depth.pth"))


def test_lora_of_another_base_size(folder, tmp_path):
    other = {k: v for k, v in _controlnet_sd(model_channels=64).items() if "input_hint_block" not in k}
    torch.save(other, tmp_path / "big_base.ckpt")
    big_base = core.load_base(str(tmp_path / "big_base.ckpt"))
    write_lora(big_base, tmp_path / "big_lora.safetensors", seed=0)
    os.replace(tmp_path / "big_lora.safetensors", folder / "big_lora.safetensors")
    (base,) = nodes.LoadBaseControlNet().load("base.ckpt")
    _expect(folder, Error, r"big_lora.safetensors does not fit this base ControlNet.*wrong shape: .*\(base expects",
            lambda: nodes.LoadCtrLoRA().load(base, "big_lora.safetensors"))


def test_lora_with_mixed_ranks(folder):
    sd = torch.load(folder / "lora0.ckpt", weights_only=True)
    key = next(k for k in sd if k.endswith("to_q.lora_layer.down.weight"))
    sd[key] = torch.zeros(8, sd[key].shape[1])
    torch.save(sd, folder / "mixed.ckpt")
    (base,) = nodes.LoadBaseControlNet().load("base.ckpt")
    _expect(folder, Error, "mixed.ckpt does not fit this base ControlNet.*rank 4", lambda: nodes.LoadCtrLoRA().load(base, "mixed.ckpt"))


def test_incomplete_lora(folder):
    sd = torch.load(folder / "lora0.ckpt", weights_only=True)
    del sd["control_model.middle_block_out.0.weight"]
    torch.save(sd, folder / "incomplete.ckpt")
    (base,) = nodes.LoadBaseControlNet().load("base.ckpt")
    _expect(folder, Error, "incomplete.ckpt does not fit.*missing: middle_block_out.0.weight",
            lambda: nodes.LoadCtrLoRA().load(base, "incomplete.ckpt"))


def test_base_missing_shared_weights(folder):
    sd = torch.load(folder / "base.ckpt", weights_only=True)
    del sd["control_model.input_blocks.1.0.in_layers.2.weight"]
    torch.save(sd, folder / "broken_base.ckpt")
    _expect(folder, Error, "broken_base.ckpt: not a consistent CtrLoRA base.*missing: input_blocks.1.0.in_layers.2.weight",
            lambda: nodes.LoadBaseControlNet().load("broken_base.ckpt"))


def test_condition_image_channels(folder):
    before = _folder_snapshot(folder)
    vae = tiny_vae()
    encode = nodes.VAEConditionEncode().encode
    gray, rgba = torch.rand(1, 32, 32, 1), torch.rand(1, 32, 32, 4)
    torch.testing.assert_close(encode(gray, vae)[0]["samples"], encode(gray.repeat(1, 1, 1, 3), vae)[0]["samples"])
    torch.testing.assert_close(encode(rgba, vae)[0]["samples"], encode(rgba[..., :3], vae)[0]["samples"])
    with pytest.raises(Error, match="VAE Condition Encode: 2 channels"):
        encode(torch.rand(1, 32, 32, 2), vae)
    with pytest.raises(Error, match="smaller than"):
        encode(torch.rand(1, 1, 1, 3), vae)
    assert _folder_snapshot(folder) == before


def test_odd_image_size_is_cropped_like_vae_encode():
    vae = tiny_vae()
    odd = torch.rand(1, 33, 35, 3)
    latent = nodes.VAEConditionEncode().encode(odd, vae)[0]["samples"]
    assert latent.shape[-2:] == (16, 17)


def test_latent_with_wrong_channels_and_bad_percent_range(folder):
    before = _folder_snapshot(folder)
    (base,) = nodes.LoadBaseControlNet().load("base.ckpt")
    condition = load_lora(base, "lora0.ckpt")
    with pytest.raises(Error, match="condition latent has 16 channels but base.ckpt takes 4"):
        apply(conditioning(0), conditioning(1), condition, torch.zeros(1, 16, 8, 8))
    with pytest.raises(Error, match=r"start_percent \(0.8\) must not be greater than end_percent \(0.2\)"):
        apply(conditioning(0), conditioning(1), condition, torch.zeros(1, 4, 8, 8), 1.0, 0.8, 0.2)
    assert _folder_snapshot(folder) == before


def test_mismatched_batches_of_latent_and_condition(folder):
    before = _folder_snapshot(folder)
    (base,) = nodes.LoadBaseControlNet().load("base.ckpt")
    condition = load_lora(base, "lora0.ckpt")
    model = tiny_model()
    positive, _ = apply(conditioning(0), conditioning(1), condition, torch.zeros(2, 4, 16, 16))
    with pytest.raises(Error, match="Apply CtrLoRA \\(lora0.ckpt\\): the condition latent has a batch of 2 but the sampled latent has 3"):
        control_outputs(positive, model, sigmas_for(model, torch.tensor([500] * 3)), torch.zeros(3, 7, 32),
                        x=torch.zeros(3, 4, 16, 16))
    assert _folder_snapshot(folder) == before


# --- Train CtrLoRA: bad datasets, settings, names and saved runs -------------------------------------------------------
# Each is refused with its message; the models folder gets nothing, and the dataset and any earlier run keep every
# byte (compared by content).

def _tree(folder):
    """Every file under ``folder`` (links not followed) with its bytes' digest."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            data = os.readlink(path).encode() if os.path.islink(path) else open(path, "rb").read()
            found.append((os.path.relpath(path, folder), hashlib.sha1(data).hexdigest()))
    return sorted(found)


def _refused(tmp_path, dataset, match, name="cond", **kwargs):
    """Runs a tiny Train CtrLoRA that must be refused; checks that nothing was written or lost."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    before = (_tree(out), _tree(dataset) if os.path.isdir(dataset) else None)
    with pytest.raises(Error, match=match):
        trainer(tiny_model(), golden_base(), tiny_vae(), dataset, out, name, **kwargs).run()
    assert (_tree(out), _tree(dataset) if os.path.isdir(dataset) else None) == before


def _pairs(path, count=3):
    return write_pairs(str(path), count)


def _prompt_json(path, lines):
    os.makedirs(path, exist_ok=True)
    write_prompt_json(path, lines)
    return str(path)


def _corrupt_targets(path):
    _pairs(path, 2)
    for name in os.listdir(path / "target"):
        (path / "target" / name).write_bytes(b"not an image")
    return str(path)


def _unpaired(path):
    _pairs(path, 2)
    for name in os.listdir(path / "target"):
        os.rename(path / "target" / name, path / "target" / ("other_" + name))
    return str(path)


BAD_DATASETS = {
    "missing folder": (lambda p: str(p / "nope"), "the dataset folder .* does not exist"),
    "not a dataset folder": (lambda p: (p.mkdir(), str(p))[1], "is not a dataset folder: it needs either prompt.json"),
    "empty source/ and target/": (lambda p: ((p / "source").mkdir(parents=True), (p / "target").mkdir(), str(p))[2],
                                  "no usable condition/target pairs"),
    "no file has a partner": (_unpaired, "no usable condition/target pairs(.|\n)*without a partner"),
    "prompt.json without a usable line": (lambda p: _prompt_json(p, ["not json", {"source": 3}]),
                                          "no usable condition/target pairs(.|\n)*not a {source, target, prompt}"),
    "prompt.json paths to missing files": (lambda p: _prompt_json(p, [{"source": "a.png", "target": "b.png"}]),
                                           "no usable condition/target pairs(.|\n)*missing files"),
    "only corrupt images": (_corrupt_targets, "no pair could be read(.|\n)*unreadable or corrupt"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_bad_datasets_are_refused_and_nothing_is_written(tmp_path, case):
    make, match = BAD_DATASETS[case]
    _refused(tmp_path, make(tmp_path / "data"), match)


@pytest.mark.parametrize("template,pattern,match", [
    ("a {broken template", "", "prompt template 'a {broken template' is not valid"),
    ("a {0} template", "", r"'\{0\}' is not a field name"),
    ("{jaw} {view}", "{jaw}_{index}", r"field\(s\) \{view\} are not in the file-name pattern"),
    ("{jaw} teeth", "{jaw}_{view}_{index}", "no usable condition/target pairs(.|\n)*do not fit the prompt template"),
])
def test_bad_templates_are_refused_and_nothing_is_written(tmp_path, template, pattern, match):
    _refused(tmp_path, _pairs(tmp_path / "data"), match, template=template, name_pattern=pattern)


@pytest.mark.parametrize("overrides,match", [
    ({"steps": 0}, r"steps must be at least 1 \(got 0\)"),
    ({"batch_size": 0}, r"batch size must be at least 1 \(got 0\)"),
    ({"grad_accum": 0}, r"gradient accumulation must be at least 1 \(got 0\)"),
    ({"prompt_dropout": 1.5}, r"prompt dropout must be in \[0, 1\] \(got 1.5\)"),
    ({"save_every": -1}, r"save_every must be 0 \(only at the end\) or more \(got -1\)"),
    ({"lr": 2.0}, r"learning rate must be in \(0, 1\] \(got 2.0\)"),
])
def test_bad_settings_are_refused_and_nothing_is_written(tmp_path, overrides, match):
    _refused(tmp_path, _pairs(tmp_path / "data"), match, config=config(**overrides))


def test_a_start_from_file_that_is_not_a_condition_lora(tmp_path):
    _refused(tmp_path, _pairs(tmp_path / "data"), "base.ckpt is a CtrLoRA base ControlNet, not a condition LoRA",
             start_from=os.path.join(GOLDEN, "base.ckpt"))


def test_a_start_from_file_of_another_rank(tmp_path):
    _refused(tmp_path, _pairs(tmp_path / "data"), "start_from lora0.ckpt has rank .* but rank is set to 8",
             start_from=os.path.join(GOLDEN, "lora0.ckpt"), config=config(rank=8))


def test_a_damaged_saved_run_is_refused_and_kept(tmp_path):
    run = tmp_path / "out" / "cond.train"
    run.mkdir(parents=True)
    (run / "state.json").write_text('{"version": 1, "step": 3, "tens')  # cut off mid-write by another tool
    _refused(tmp_path, _pairs(tmp_path / "data"), "the saved run in .*cond.train cannot be read .*remove that folder")


def test_a_resume_with_other_settings_or_data_is_refused_and_the_saved_run_kept(tmp_path):
    import comfy.model_management
    from training_helpers import training

    class CancelAfterStep1(training.ComfyReporter):
        def step(self, step, total, loss, **kwargs):
            super().step(step, total, loss, **kwargs)
            comfy.model_management.interrupt_current_processing(True)

    dataset = _pairs(tmp_path / "data", 4)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        trainer(tiny_model(), golden_base(), tiny_vae(), dataset, tmp_path / "out", "cond",
                config=config(steps=4, validation_fraction=0.0), reporter=CancelAfterStep1(min_interval=0.0)).run()
    assert os.path.isfile(tmp_path / "out" / "cond.train" / "state.json")
    _refused(tmp_path, dataset, "resume: these settings differ .*lr: saved 0.001, now 0.002",
             config=config(steps=4, lr=2e-3, validation_fraction=0.0))
    _refused(tmp_path, write_pairs(str(tmp_path / "other"), 4, seed=5), "dataset differs",
             config=config(steps=4, validation_fraction=0.0))

"""Datasets for training: both folder layouts, prompts from templates and captions, skipped files, bad folders."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from training_helpers import SIZE, core, prompt_encoder, training, write_pairs, write_prompt_json

CtrLoRAError = core.CtrLoRAError


def names(pairs):
    return [p.name for p in pairs]


def encode(pairs, report):
    model = tiny.tiny_model()
    return training.encode_dataset(pairs, report, tiny.tiny_vae(), prompt_encoder(), model.model.latent_format, SIZE)


# --- layouts and prompts -------------------------------------------------------------------------------------------

def test_paired_folder_with_a_template_filled_from_file_names(tmp_path):
    write_pairs(str(tmp_path), 0, names=["upper_front_0012", "lower_left_0003"])
    template = "a 3D dental model of {jaw} teeth, {view} view, dental photography"
    pairs, report = training.scan(str(tmp_path), template)
    assert {p.name: p.prompt for p in pairs} == {
        os.path.join("target", "lower_left_0003.png"): "a 3D dental model of lower teeth, left view, dental photography",
        os.path.join("target", "upper_front_0012.png"): "a 3D dental model of upper teeth, front view, dental photography",
    }
    assert report.layout == "source/target" and report.skipped_count == 0


def test_file_name_pattern_names_the_parts(tmp_path):
    write_pairs(str(tmp_path), 0, names=["front-upper-7", "odd"])
    pairs, report = training.scan(str(tmp_path), "{jaw} teeth, {view} view ({name})", "{view}-{jaw}-{index}")
    assert [p.prompt for p in pairs] == ["upper teeth, front view (front-upper-7)"]
    assert report.skipped["name_mismatch"] == ["target/odd.png"]


def test_captions_are_prompts_when_no_template_is_given(tmp_path):
    write_pairs(str(tmp_path), 0, names=["a", "b", "c"])
    (tmp_path / "target" / "a.txt").write_text("caption next to the target\n")
    (tmp_path / "source" / "b.txt").write_text("caption next to the source")
    pairs, report = training.scan(str(tmp_path))
    assert [p.prompt for p in pairs] == ["caption next to the target", "caption next to the source", ""]
    assert report.prompts_from == {"captions": 2, "nothing (empty prompt)": 1}
    pairs, _ = training.scan(str(tmp_path), "photo, {caption}")
    assert [p.prompt for p in pairs] == ["photo, caption next to the target", "photo, caption next to the source"]


def test_official_prompt_json_layout(tmp_path):
    write_pairs(str(tmp_path), 3)
    write_prompt_json(tmp_path, [
        {"source": "source/item_0000.png", "target": "target/item_0000.png", "prompt": "first"},
        {"source": "source/item_0001.png", "target": "target/item_0001.png", "prompt": "second"},
        "",
        {"source": "source/item_0002.png", "target": "target/item_0002.png"},
    ])
    pairs, report = training.scan(str(tmp_path))
    assert report.layout == "prompt.json"
    assert [p.prompt for p in pairs] == ["first", "second", ""]
    assert pairs[0].source == os.path.realpath(tmp_path / "source" / "item_0000.png")


def test_bad_prompt_json_lines_and_paths_outside_the_folder_are_skipped(tmp_path):
    folder = tmp_path / "data"
    write_pairs(str(folder), 2)
    write_pairs(str(tmp_path / "elsewhere"), 1)
    os.symlink(tmp_path / "elsewhere" / "target" / "item_0000.png", folder / "target" / "link.png")
    write_prompt_json(folder, [
        {"source": "source/item_0000.png", "target": "target/item_0000.png", "prompt": "ok"},
        {"source": "../elsewhere/source/item_0000.png", "target": "target/item_0001.png", "prompt": "escape"},
        {"source": str(tmp_path / "elsewhere" / "source" / "item_0000.png"), "target": "target/item_0001.png"},
        {"source": "source/item_0001.png", "target": "target/link.png", "prompt": "symlink out"},
        {"source": "source/missing.png", "target": "target/item_0001.png"},
        "not json",
        {"source": 3, "target": "target/item_0001.png"},
        ["a", "list"],
    ])
    pairs, report = training.scan(str(folder))
    assert [p.prompt for p in pairs] == ["ok"]
    assert len(report.skipped["outside"]) == 3
    assert report.skipped["missing"] == ["source/missing.png"]
    assert report.skipped["bad_line"] == ["line 6", "line 7", "line 8"]
    assert "skipped 3 prompt.json paths outside the dataset folder" in report.summary()


# --- skips and errors ----------------------------------------------------------------------------------------------

def test_unpaired_non_image_and_corrupt_files_are_skipped_and_counted(tmp_path):
    write_pairs(str(tmp_path), 4)
    os.remove(tmp_path / "target" / "item_0003.png")  # source only
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "target" / "lonely.png")  # target only
    (tmp_path / "source" / "notes.md").write_text("not an image")
    (tmp_path / "source" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "target" / "item_0000.tif").write_bytes(b"same stem, second image")
    (tmp_path / "source" / "item_0001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupt
    pairs, report = training.scan(str(tmp_path))
    assert names(pairs) == [os.path.join("target", f"item_000{i}.png") for i in range(3)]
    assert sorted(report.skipped["unpaired"]) == ["source/item_0003.png", "target/lonely.png"]
    assert sorted(report.skipped["not_image"]) == ["source/.DS_Store", "source/notes.md"]
    assert report.skipped["duplicate"] == ["target/item_0000.tif"]

    data = encode(pairs, report)  # decoding finds the corrupt one
    assert report.skipped["unreadable"] == [os.path.join("source", "item_0001.png")]
    assert len(data) == report.used == 2
    assert "2 pairs used" in report.summary() and "skipped 1 unreadable or corrupt images" in report.summary()


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "not a dataset folder"),
    (lambda p: (p / "source").mkdir() or (p / "target").mkdir(), "no usable condition/target pairs"),
    (lambda p: write_pairs(str(p), 0, names=["a"]) and os.remove(p / "target" / "a.png"), "without a partner"),
    (lambda p: write_prompt_json(p, ["{}"]), "no usable condition/target pairs"),
])
def test_empty_or_unusable_folders_are_errors(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(CtrLoRAError, match=message):
        training.scan(str(tmp_path))


def test_missing_folder_and_bad_template_are_errors(tmp_path):
    with pytest.raises(CtrLoRAError, match="does not exist"):
        training.scan(str(tmp_path / "nope"))
    with pytest.raises(CtrLoRAError, match="no dataset folder"):
        training.scan("  ")
    write_pairs(str(tmp_path), 1)
    with pytest.raises(CtrLoRAError, match="not valid"):
        training.scan(str(tmp_path), "a {broken template")
    with pytest.raises(CtrLoRAError, match="not a field name"):
        training.scan(str(tmp_path), "a {0} template")
    with pytest.raises(CtrLoRAError, match="not in the file-name pattern"):
        training.scan(str(tmp_path), "{jaw} {view}", "{jaw}_{index}")


def test_a_folder_of_only_corrupt_images_is_an_error_after_decoding(tmp_path):
    write_pairs(str(tmp_path), 2)
    for name in os.listdir(tmp_path / "target"):
        (tmp_path / "target" / name).write_bytes(b"garbage")
    pairs, report = training.scan(str(tmp_path))
    with pytest.raises(CtrLoRAError, match="no pair could be read"):
        encode(pairs, report)


# --- images and the cache ------------------------------------------------------------------------------------------

def test_images_are_resized_by_the_short_side_and_centre_cropped(tmp_path):
    image = np.zeros((40, 80, 3), np.uint8)  # 80 wide, 40 high; a white band in the middle 40 columns
    image[:, 20:60] = 255
    Image.fromarray(image).save(tmp_path / "wide.png")
    Image.fromarray(image[..., 0]).save(tmp_path / "gray.png")
    for name in ("wide.png", "gray.png"):
        loaded = training.load_image(str(tmp_path / name), 20)
        assert loaded.shape == (20, 20, 3) and loaded.dtype == torch.float32
        assert loaded.min() >= 0 and loaded.max() <= 1
        torch.testing.assert_close(loaded[:, 2:18], torch.ones(20, 16, 3), atol=0.02, rtol=0)


def test_each_distinct_prompt_is_encoded_once(tmp_path):
    write_pairs(str(tmp_path), 0, names=["upper_front_1", "upper_front_2", "lower_front_3"])
    calls = []
    encoder = prompt_encoder()

    def counting(prompt):
        calls.append(prompt)
        return encoder(prompt)

    pairs, report = training.scan(str(tmp_path), "{jaw} {view}")
    model = tiny.tiny_model()
    data = training.encode_dataset(pairs, report, tiny.tiny_vae(), counting, model.model.latent_format, SIZE)
    assert sorted(calls) == ["", "lower front", "upper front"]
    assert data.prompts[data.prompt_ids[0]] == "lower front" and data.prompt_ids.tolist()[1:] == [2, 2]
    assert data.hints.shape == data.targets.shape == (3, 4, SIZE // 2, SIZE // 2)


def test_cached_hints_and_targets_are_what_inference_and_vae_encode_give(tmp_path):
    """The hint is 'VAE Condition Encode' + the model's latent format (as Apply CtrLoRA feeds the ControlNet);
    the target is ComfyUI's VAE Encode + the latent format (as the UNet sees latents)."""
    write_pairs(str(tmp_path), 2)
    pairs, report = training.scan(str(tmp_path))
    data = encode(pairs, report)
    vae, model = tiny.tiny_vae(), tiny.tiny_model()
    condition = training.load_image(pairs[1].source, SIZE)[None]
    target = training.load_image(pairs[1].target, SIZE)[None]
    hint = model.model.latent_format.process_in(core.encode_condition(vae, condition))
    x0 = model.model.latent_format.process_in(vae.encode(target))
    torch.testing.assert_close(data.hints[1:2], hint)
    torch.testing.assert_close(data.targets[1:2], x0)


def test_contexts_of_different_lengths_batch_like_comfyui(tmp_path):
    data = training.EncodedDataset(
        hints=torch.zeros(2, 4, 2, 2), targets=torch.zeros(2, 4, 2, 2), prompt_ids=torch.tensor([0, 1]),
        contexts=[torch.ones(1, 77, 3), torch.arange(154 * 3.0).view(1, 154, 3)], prompts=["", "long"],
        names=["a", "b"])
    batch = data.context_batch(torch.tensor([0, 1]), "cpu", torch.float32)
    assert batch.shape == (2, 154, 3)
    torch.testing.assert_close(batch[0], torch.ones(154, 3))

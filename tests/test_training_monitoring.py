"""Seeing a run learn (held-out loss, previews), what it keeps on disk, its schedule, and queueing it again."""
import importlib
import json
import os

import pytest
import safetensors
import torch

import tiny
from conftest import pack
from training_helpers import SIZE, Recorder, config, core, golden_base, trainer, training, write_pairs
from training_helpers import one_thread  # noqa: F401 (fixture)

CtrLoRAError = core.CtrLoRAError
validation = importlib.import_module(f"{pack.__name__}.training.validation")
schedule = importlib.import_module(f"{pack.__name__}.training.schedule")
previews = importlib.import_module(f"{pack.__name__}.training.previews")


@pytest.fixture
def dataset(tmp_path):
    return write_pairs(str(tmp_path / "data"), 10)


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


@pytest.mark.parametrize("total, fraction, expected", [(10, 0.05, 1), (1000, 0.05, 8), (100, 0.05, 5), (1, 0.5, 0),
                                                       (10, 0, 0), (3, 0.4, 1)])
def test_held_out_pairs_are_a_small_capped_fraction(total, fraction, expected):
    assert validation.held_out_count(total, fraction) == expected


def test_held_out_loss_is_measured_at_fixed_noise_shown_and_recorded(dataset, out):
    reporter = Recorder()
    cfg = config(steps=6, validation_fraction=0.2, validate_every=3)
    run = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond", config=cfg,
                  reporter=reporter)
    result = run.run()
    # 2 of 10 pairs held out: never trained on, scored at steps 3 and 6 (events are sent for each point).
    assert len(run.validator.data) == 2 and len(run.data) == 8
    assert not set(run.validator.data.names) & set(run.data.names)
    assert [s for s, _ in result.validation_losses] == [3, 6]
    sent = [p for e in reporter.events for p in e.get("val_losses", [])]
    assert sent == [list(p) for p in result.validation_losses]
    assert "Held-out loss (2 pairs)" in result.report
    with safetensors.safe_open(result.path, "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["validation_losses"]) == [list(p) for p in result.validation_losses]
    assert metadata["validation_pairs"] == "2" and metadata["dataset_size"] == "8"
    # Fixed noise and timesteps: the same weights score the same, other weights differently.
    again = run.validator.loss(result.condition, run.device, run.updater.autocast)
    assert again == pytest.approx(result.validation_losses[-1][1], rel=1e-4)
    fresh = core.Condition(run.base, core.ConditionAdapter.fresh(run.base.model, 4, torch.Generator().manual_seed(0)),
                           "fresh")
    assert run.validator.loss(fresh, run.device, run.updater.autocast) != pytest.approx(again, rel=1e-3)


def test_previews_are_shown_saved_and_gathered_in_a_grid(dataset, out):
    reporter = Recorder()
    cfg = config(steps=4, validation_fraction=0.2, save_every=0)
    settings = previews.PreviewSettings(every=2, steps=2, sampler="euler", cfg=2.0)
    result = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond", config=cfg,
                     reporter=reporter, previews=settings).run()
    # Two held-out items side by side, at steps 2 and 4.
    assert reporter.previews == [(2, (SIZE, 2 * SIZE, 3)), (4, (SIZE, 2 * SIZE, 3))]
    folder = out / "cond.train" / "previews"
    assert sorted(os.listdir(folder)) == ["grid.png", "step000002.png", "step000004.png"]
    # One row per item: condition | target | preview at step 2 | at step 4.
    grid = result.preview_grid
    assert grid.shape == (1, 2 * SIZE, 4 * SIZE, 3)
    condition = training.load_image(os.path.join(dataset, "source", "item_0002.png"), SIZE)  # first held out
    assert torch.allclose(grid[0, :SIZE, :SIZE], condition, atol=1 / 255)
    assert grid[0, :SIZE, 2 * SIZE:].std() > 0  # a picture, not an empty cell


def test_a_user_image_can_drive_the_previews(dataset, out):
    reporter = Recorder()
    image = torch.rand(1, SIZE, SIZE, 3)
    settings = previews.PreviewSettings(every=2, steps=1)
    result = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond",
                     config=config(steps=2, validation_fraction=0), reporter=reporter, previews=settings,
                     preview_image=image).run()
    assert reporter.previews == [(2, (SIZE, SIZE, 3))]
    assert torch.allclose(result.preview_grid[0, :, :SIZE], image[0], atol=1 / 255)


def test_only_the_newest_snapshots_are_kept_and_the_disk_use_is_reported(dataset, out):
    result = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond",
                     config=config(steps=5, save_every=1, keep_snapshots=2)).run()
    snapshots = sorted(f for f in os.listdir(out / "cond.train") if f.endswith(".safetensors"))
    assert snapshots == ["cond_step000003.safetensors", "cond_step000004.safetensors"]
    assert "MiB (intermediate LoRAs, previews)" in result.report


def test_warm_up_and_cosine_schedule():
    factors = [schedule.lr_factor(step, 10, warmup=2, schedule="cosine") for step in range(1, 11)]
    assert factors[:2] == [0.5, 1.0] and factors[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))
    assert [schedule.lr_factor(step, 10) for step in (1, 10)] == [1.0, 1.0]  # the official constant rate


def test_a_cosine_run_ends_at_rate_zero_and_resume_keeps_the_schedule(dataset, out):
    cfg = config(steps=4, lr_schedule="cosine", warmup_steps=1, validation_fraction=0)
    run = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond", config=cfg)
    run.run()
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    changed = config(steps=5, lr_schedule="cosine", warmup_steps=1, validation_fraction=0)
    with pytest.raises(CtrLoRAError, match=r"steps: 4 then, 5 now"):
        trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond", config=changed).run()


def test_queueing_the_same_training_again_loads_its_output(dataset, out):
    cfg = config(steps=2)
    first = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond", config=cfg).run()
    reporter = Recorder()
    again = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond", config=cfg,
                    reporter=reporter).run()
    assert again.reused and again.path == first.path and again.steps == 2
    assert reporter.events[-1]["status"] == "reused" and not any(e.get("losses") for e in reporter.events)
    assert again.validation_losses == [list(p) for p in first.validation_losses]
    for a, b in zip(first.condition.adapter.tensors, again.condition.adapter.tensors):
        assert torch.equal(a.float(), b.float())
    # Only showing or keeping things differently still counts as the same run.
    same = config(steps=2, save_every=7, keep_snapshots=1, gradient_checkpointing=True)
    assert trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond", config=same).run().reused


def test_queueing_with_other_settings_or_data_says_what_differs(dataset, out):
    trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond", config=config(steps=2)).run()
    with pytest.raises(CtrLoRAError, match=r"other settings \(lr: 0.001 then, 0.002 now; steps: 2 then, 3 now\).*"
                                           r"new output_name"):
        trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond",
                config=config(steps=3, lr=2e-3)).run()
    write_pairs(dataset, 1, seed=9, names=["extra"])
    with pytest.raises(CtrLoRAError, match=r"dataset: other files"):
        trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond", config=config(steps=2)).run()
    # The existing file is untouched.
    assert sorted(os.listdir(out)) == ["cond.safetensors"]

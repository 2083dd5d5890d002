"""A training run that goes wrong says so, says what to try, and keeps its last save: never 'done'."""
import json
import os

import pytest
import safetensors.torch
import torch

import tiny
from training_helpers import Recorder, config, core, golden_base, trainer
from training_helpers import dataset, one_thread  # noqa: F401 (fixtures)

CtrLoRAError = core.CtrLoRAError


def failing_at(objective, step, error):
    """Makes the loss of optimizer step ``step`` (1-based) fail with ``error`` (a value or an exception)."""
    calls = []
    loss = objective.loss

    def patched(*args, **kwargs):
        calls.append(1)
        value = loss(*args, **kwargs)
        if len(calls) == step:
            if isinstance(error, BaseException):
                raise error
            return value * error
        return value
    objective.loss = patched


def test_a_non_finite_loss_stops_the_run_names_the_step_and_keeps_the_last_save(dataset, tmp_path):
    reporter = Recorder()
    run = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, tmp_path / "out", "cond",
                  config=config(steps=5, save_every=2, validation_fraction=0), reporter=reporter)
    run.prepare()
    failing_at(run.objective, 3, float("nan"))
    with pytest.raises(CtrLoRAError, match=r"the loss became nan at step 3 .*keeps its last save.*lower "
                                           r"learning_rate.*precision fp32.*gradient_checkpointing on"):
        run.run()
    out = tmp_path / "out"
    assert not (out / "cond.safetensors").exists()
    assert json.load(open(out / "cond.train" / "state.json"))["step"] == 2
    points = [p for e in reporter.events for p in e.get("losses", [])]
    assert [s for s, _ in points] == [1, 2, 3] and points[-1][1] is None  # marked, not dropped
    assert reporter.events[-1]["status"] == "error" and "step 3" in reporter.events[-1]["message"]


def test_out_of_memory_keeps_the_last_save_and_says_what_to_change(dataset, tmp_path):
    run = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, tmp_path / "out", "cond",
                  config=config(steps=5, save_every=0, validation_fraction=0))
    run.prepare()
    failing_at(run.objective, 3, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(CtrLoRAError, match=r"out of GPU memory at step 3 \(resolution 32, batch 2\); the run keeps "
                                           r"its save at step 2.*gradient_checkpointing on.*--lowvram"):
        run.run()
    assert json.load(open(tmp_path / "out" / "cond.train" / "state.json"))["step"] == 2
    resumed = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, tmp_path / "out", "cond",
                      config=config(steps=5, save_every=0, validation_fraction=0)).run()
    assert resumed.steps == 5 and "resumed at step 2" in resumed.report


def test_a_base_stripped_of_its_norms_does_not_seed_a_new_condition(dataset, tmp_path):
    tensors = {k: v for k, v in core.checkpoint.load_state_dict(tiny.GOLDEN + "/base.ckpt").items() if "norm" not in k}
    stripped_path = str(tmp_path / "stripped.safetensors")
    safetensors.torch.save_file({"control_model." + k: v.contiguous() for k, v in tensors.items()}, stripped_path)
    stripped = core.load_base(stripped_path)
    with pytest.raises(CtrLoRAError, match=r"stripped.safetensors has no norm weights .*start_from"):
        trainer(tiny.tiny_model(), stripped, tiny.tiny_vae(), dataset, tmp_path / "out", "cond",
                config=config(steps=1)).run()
    # The norms taken from a named source: an existing condition of this base.
    result = trainer(tiny.tiny_model(), stripped, tiny.tiny_vae(), dataset, tmp_path / "out", "cond",
                     config=config(steps=1), start_from=tiny.GOLDEN + "/lora0.ckpt").run()
    assert os.path.exists(result.path)


def test_a_save_left_unfinished_by_a_killed_process_does_not_block_the_resume(dataset, tmp_path):
    """SIGKILL during a save leaves a hidden temporary file in the run folder; the next run removes it and resumes."""
    out = tmp_path / "out"
    run = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond",
                  config=config(steps=4, save_every=2, validation_fraction=0))
    run.prepare()
    failing_at(run.objective, 3, RuntimeError("killed"))
    with pytest.raises(RuntimeError, match="killed"):
        run.run()
    leftover = out / "cond.train" / ".partial-0123456789abcdef"
    leftover.write_bytes(b"half a state")
    resumed = trainer(tiny.tiny_model(), golden_base(), tiny.tiny_vae(), dataset, out, "cond",
                      config=config(steps=4, save_every=2, validation_fraction=0)).run()
    assert resumed.steps == 4 and "resumed at step 2" in resumed.report and not leftover.exists()

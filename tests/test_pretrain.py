"""Pretraining a base ControlNet on several conditions (CPU, tiny models): it learns, its files are official and
load, a later condition learns faster on it, torchrun (2 processes, gloo) matches one process, a killed run resumes,
bad input is refused."""
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

import tiny
from conftest import COMFYUI, ROOT, pack
from training_helpers import (SIZE, base_from_unet, config, core, held_out_batch, objective, pretrain_unet,
                              prompt_encoder, trainer, training, unit_latent_model, white_on_black, write_pairs)

pretrain = importlib.import_module(f"{pack.__name__}.training.pretrain")
sharding = importlib.import_module(f"{pack.__name__}.training.sharding")
CtrLoRAError = core.CtrLoRAError
SCRIPT = os.path.join(ROOT, "scripts", "pretrain_base.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
MODELS = os.path.join(ROOT, "tests", "pretrain_models.py") + ":tiny"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run fastest on one thread (as in test_training); the subprocesses get --threads 1."""
    threads, _ = torch.get_num_threads(), torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- conditions: the same cell pattern drawn in different ways -----------------------------------------------------

def inverted(cells):
    return 255 - white_on_black(cells)


def dots(cells):
    y, x = np.indices(cells.shape)
    return white_on_black(cells & (y % 4 >= 1) & (y % 4 <= 2) & (x % 4 >= 1) & (x % 4 <= 2))


def outline(cells):
    y, x = np.indices(cells.shape)
    return white_on_black(cells & ((y % 4 == 0) | (y % 4 == 3) | (x % 4 == 0) | (x % 4 == 3)))


RENDERS = {"mask": white_on_black, "inverted": inverted, "dots": dots}


def pretrain_config(**overrides):
    values = dict(rank=8, steps=300, batch_size=4, lr=1e-3, resolution=SIZE, save_every=0, seed=0)
    values.update(overrides)
    return pretrain.PretrainConfig(**values)


def loaded_base(path, model):
    """A base file as 'Load Base ControlNet' loads it, with the head layout of ``model`` (which the control takes
    from the UNet when it runs)."""
    base = core.load_base(str(path))
    base.model.set_attention_heads(model.model.model_config.unet_config)
    return base


def held_out(model, vae, folder):
    pairs, report = training.scan(folder, "a pattern")
    return held_out_batch(training.encode_dataset(pairs, report, vae, prompt_encoder(), model.model.latent_format,
                                                  SIZE))


# --- it learns, and it transfers --------------------------------------------------------------------------------------

def test_pretraining_learns_every_condition_and_a_new_condition_learns_faster_on_it(tmp_path):
    """A tiny SD model pretrained (unconditionally) on the domain; three conditions draw the same cell pattern filled,
    inverted and as dots. The base starts as the UNet's encoder (zero convs zero: the control is zero, so step-0 loss
    == UNet-alone loss). After 300 steps each condition's held-out loss (its LoRA file on the base file, loaded as
    the nodes load them) is clearly lower.

    Then a new condition (the cells' outlines: related to what the base saw, not one of its conditions) is trained
    with the single-condition trainer (lr 1e-4, batch 4): after 20 steps on the pretrained base its held-out loss is
    lower than after 20 steps on a fresh base (a copy of the UNet's encoder), by the asserted ratio, and lower than
    the fresh base reaches in 60 steps. (In this tiny setting the benefit is for related conditions: an unrelated
    colour scheme, green cells on magenta, was not reliably faster.)"""
    model, vae = unit_latent_model(), tiny.tiny_vae()
    folders = {name: write_pairs(str(tmp_path / name), 48, seed=i, render=render)
               for i, (name, render) in enumerate(RENDERS.items())}
    held = {name: held_out(model, vae, write_pairs(str(tmp_path / f"held_{name}"), 12, seed=10 + i, render=render))
            for i, (name, render) in enumerate(RENDERS.items())}
    pairs, report = training.scan(folders["mask"], "a pattern")
    pretrain_unet(model, training.encode_dataset(pairs, report, vae, prompt_encoder(), model.model.latent_format,
                                                 SIZE), steps=300)
    started = time.monotonic()
    result = pretrain.Pretrainer(model, prompt_encoder(), vae, list(folders.items()), tmp_path / "out", "base",
                                 pretrain_config(), template="a pattern").run()
    seconds = time.monotonic() - started
    assert result.status == "done" and result.step == 300
    assert sorted(name for _, name, _ in result.losses[:3]) == sorted(RENDERS)  # one round: each condition once

    base = loaded_base(result.base_path, model)
    loss = training.NoisePrediction(model, base)
    losses = {}
    for name in RENDERS:
        condition = core.load_condition(base, result.lora_paths[name])
        losses[name] = {"UNet alone (= step 0)": objective.mean_loss(loss, None, *held[name]),
                        "pretrained": objective.mean_loss(loss, condition, *held[name])}

    new = write_pairs(str(tmp_path / "new"), 48, seed=20, render=outline)
    new_held = held_out(model, vae, write_pairs(str(tmp_path / "held_new"), 12, seed=21, render=outline))
    fresh = loaded_base(base_from_unet(model, tmp_path / "fresh.safetensors"), model)

    def finetune(on, steps, label):
        run = trainer(model, on, vae, new, tmp_path / label, "new", config=config(rank=8, steps=steps, lr=1e-4,
                                                                                  batch_size=4),
                      template="a pattern").run()
        return objective.mean_loss(training.NoisePrediction(model, on), run.condition, *new_held)

    transfer = {"pretrained base, 20 steps": finetune(base, 20, "p20"), "fresh base, 20 steps": finetune(fresh, 20, "f20"),
                "fresh base, 60 steps": finetune(fresh, 60, "f60")}
    ratio = transfer["pretrained base, 20 steps"] / transfer["fresh base, 20 steps"]
    print(json.dumps({"held-out loss per condition": losses, "new condition": transfer, "ratio at 20 steps": ratio,
                      "pretraining s/step": round(seconds / 300, 4)}, indent=1))
    for name, values in losses.items():
        assert values["pretrained"] < 0.9 * values["UNet alone (= step 0)"], name
    assert ratio < 0.96
    assert transfer["pretrained base, 20 steps"] < transfer["fresh base, 60 steps"]


# --- the plan: the same samples on any number of processes ----------------------------------------------------------

def test_the_plan_depends_on_the_global_batch_only_and_shards_the_data():
    sizes = {"a": 10, "b": 3, "c": 8}
    plan = sharding.Plan(0, sizes, 8)
    halves = [sharding.positions(r, 2, 8) for r in range(2)]
    assert list(sharding.positions(0, 1, 8)) == [*halves[0], *halves[1]]
    counts = {name: [0] * size for name, size in sizes.items()}
    for step in range(60):
        name = plan.condition(step)
        if step % 3 == 0:  # each round visits every condition once, in a shuffled order
            assert sorted(plan.condition(step + k) for k in range(3)) == sorted(sizes)
        assert plan.uses_before(name, step) == sum(plan.condition(s) == name for s in range(step))
        for half in halves:  # each process draws only from its own shard
            assert set(plan.items(step, half)) <= set(plan.shard(name, half))
        for i in plan.items(step, range(8)):
            counts[name][i] += 1
    shards = [set(plan.shard("a", half)) for half in halves]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(10))  # N >= B: disjoint shards
    assert set(plan.shard("b", halves[0])) | set(plan.shard("b", halves[1])) == {0, 1, 2}
    for name, used in counts.items():  # every pair is used, about equally often
        assert min(used) > 0 and max(used) <= 2 * min(used) + 1, (name, used)
    dropped, timesteps, noise = plan.draws(5, 1000, 0.3, (4, 2, 2))
    again = sharding.Plan(0, sizes, 8).draws(5, 1000, 0.3, (4, 2, 2))
    assert torch.equal(noise, again[2]) and torch.equal(timesteps, again[1]) and dropped.shape == (8,)


# --- files, resume and bad input, in one process ----------------------------------------------------------------------

@pytest.fixture
def conditions(tmp_path):
    return [(name, write_pairs(str(tmp_path / name), 8, seed=i, render=render))
            for i, (name, render) in enumerate(RENDERS.items())]


@pytest.fixture
def out(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def small(conditions, out, name="base", model=None, config=None, **kwargs):
    return pretrain.Pretrainer(model or tiny.tiny_model(), prompt_encoder(), tiny.tiny_vae(), conditions, out, name,
                               config or pretrain_config(rank=4, steps=6, batch_size=2), **kwargs)


def load(path):
    return safetensors.torch.load_file(str(path))


def test_outputs_are_official_files_that_the_loaders_read(conditions, out):
    model = tiny.tiny_model()
    trainer_ = small(conditions, out, "mybase", model=model)
    result = trainer_.run()
    assert result.status == "done" and len(result.losses) == 6
    assert sorted(os.listdir(out)) == ["mybase.safetensors", "mybase_dots_rank4.safetensors",
                                       "mybase_inverted_rank4.safetensors", "mybase_mask_rank4.safetensors"]
    base_file = load(result.base_path)
    base = loaded_base(result.base_path, model)
    expected = core.lora.expected_shapes(base.model, 4)
    lora_keys = {"control_model." + k for k in expected if "lora_layer" in k}
    core_keys = {"control_model." + k for k in base.model.state_dict()}
    assert set(base_file) == core_keys | lora_keys  # shared core + zero convs + norms, and one set of LoRA layers
    loras = {name: load(path) for name, path in result.lora_paths.items()}
    for name, tensors in loras.items():
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {"control_model." + k: s for k, s in expected.items()}
        for key in tensors:
            if "lora_layer" not in key:  # the zero convs, middle_block_out and norms are the shared ones
                assert torch.equal(tensors[key], base_file[key]), key
    for key in lora_keys:  # the base's LoRA layers are those of the first condition
        assert torch.equal(base_file[key], loras["dots"][key])
    assert not torch.equal(loras["dots"][sorted(lora_keys)[1]], loras["mask"][sorted(lora_keys)[1]])
    zero_conv = "control_model.zero_convs.0.0.weight"
    assert base_file[zero_conv].abs().max() > 0  # trained from zero
    with safetensors.safe_open(result.lora_paths["mask"], "pt") as f:
        metadata = f.metadata()
    assert metadata["ctrlora_format"] == "lora" and metadata["condition"] == "mask" and metadata["steps"] == "6"
    assert metadata["base"] == "mybase.safetensors" and metadata["dataset_size"] == "8"
    with safetensors.safe_open(result.base_path, "pt") as f:
        assert f.metadata()["conditions"] == "dots,inverted,mask"

    # Loaded through the nodes' loaders, a condition gives exactly the control of the trained one in memory.
    loaded = core.load_condition(base, result.lora_paths["mask"])
    hint, context, t = torch.randn(1, 4, 16, 16), torch.randn(1, 7, tiny.CONTEXT_DIM), torch.tensor([500.0])
    with torch.no_grad():
        trained = trainer_.module.conditions["mask"](hint, t, context)
        again = loaded(hint, t, context)
    for a, b in zip(trained["output"] + trained["middle"], again["output"] + again["middle"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(o.abs().max() > 0 for o in again["output"])


def test_stop_and_resume_gives_the_weights_of_an_uninterrupted_run(conditions, out):
    full = small(conditions, out, "full", config=pretrain_config(rank=4, steps=6, batch_size=2, save_every=2)).run()
    config = pretrain_config(rank=4, steps=6, batch_size=2, save_every=2, stop_after=3)
    stopped = small(conditions, out, "cut", config=config).run()
    assert stopped.status == "stopped" and stopped.step == 3
    assert not os.path.exists(out / "cut.safetensors")
    state = json.load(open(out / "cut.train" / "state.json"))
    assert state["step"] == 3 and [c["name"] for c in state["conditions"]] == ["dots", "inverted", "mask"]
    assert sorted(os.listdir(out / "cut.train")) == ["state-00000003.tensors", "state.json", "step000002",
                                                     "step000003"]
    core.load_condition(core.load_base(stopped.base_path), stopped.lora_paths["mask"])  # snapshots load

    with pytest.raises(CtrLoRAError, match="saved run of 'cut' exists"):
        small(conditions, out, "cut").run()
    resumed = small(conditions, out, "cut", config=dataclasses.replace(config, stop_after=0), resume=True).run()
    assert resumed.status == "done" and "resumed at step 3" in resumed.report
    assert [l for *_, l in resumed.losses] == [l for *_, l in full.losses]
    for a, b in [(full.base_path, resumed.base_path)] + \
            [(full.lora_paths[n], resumed.lora_paths[n]) for n in RENDERS]:
        expected, actual = load(a), load(b)
        assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert not os.path.exists(out / "cut.train" / "state.json")


def test_resume_refuses_unknown_or_missing_conditions_and_other_settings(conditions, out, tmp_path):
    config = pretrain_config(rank=4, steps=6, batch_size=2, stop_after=2)
    small(conditions, out, "cut", config=config).run()
    other = ("other", write_pairs(str(tmp_path / "other"), 8, seed=9))
    with pytest.raises(CtrLoRAError, match=r"unknown condition\(s\) other.*trains dots, inverted, mask"):
        small(conditions + [other], out, "cut", config=config, resume=True).run()
    with pytest.raises(CtrLoRAError, match=r"condition\(s\) dots of the saved run not given"):
        small(conditions[:2], out, "cut", config=config, resume=True).run()
    with pytest.raises(CtrLoRAError, match="lr: saved 0.001, now 0.002"):
        small(conditions, out, "cut", config=dataclasses.replace(config, lr=2e-3), resume=True).run()
    with pytest.raises(CtrLoRAError, match=r"global_batch: saved 2, now 4"):
        small(conditions, out, "cut", config=dataclasses.replace(config, batch_size=4), resume=True).run()
    changed = [(n, other[1] if n == "mask" else f) for n, f in conditions]
    with pytest.raises(CtrLoRAError, match=r"dataset of condition\(s\) mask differs"):
        small(changed, out, "cut", config=config, resume=True).run()


def test_continue_from_an_existing_base(conditions, out):
    first = small(conditions, out, "first").run()
    config = pretrain_config(rank=4, steps=1, batch_size=2, lr=1e-8)
    second = small(conditions[:1], out, "second", config=config, init_base=first.base_path).run()
    before, after = load(first.base_path), load(second.base_path)
    for key in before:
        if "lora_layer" not in key:  # the shared weights start from the given base; the LoRAs are new
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_training(conditions, out):
    plain = small(conditions, out, "plain").run()
    config = pretrain_config(rank=4, steps=6, batch_size=2, gradient_checkpointing=True)
    checkpointed = small(conditions, out, "ckpt", config=config).run()
    for a, b in [(plain.base_path, checkpointed.base_path)] + \
            [(plain.lora_paths[n], checkpointed.lora_paths[n]) for n in RENDERS]:
        expected, actual = load(a), load(b)
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_bad_input_is_refused_with_a_clear_message(conditions, out, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "source").mkdir(parents=True)
    (empty / "target").mkdir()
    with pytest.raises(CtrLoRAError, match=r"condition 'blank' \(.*empty\): no usable condition/target pairs"):
        small(conditions + [("blank", str(empty))], out).run()
    for specs, message in [([], "no condition given"), (["canny"], "write it as name=folder"),
                           (["a b=x"], "condition name 'a b'"), (["a=x", "a=y"], "'a' is given twice")]:
        with pytest.raises(CtrLoRAError, match=message):
            pretrain.parse_conditions(specs)

    # A base made for another model size.
    wide = tiny.tiny_model(unet_config={**tiny.TINY_UNET, "model_channels": 64})
    wrong = base_from_unet(wide, tmp_path / "wide.safetensors")
    with pytest.raises(CtrLoRAError, match=r"wide.safetensors does not fit the model .*time_embed.0.weight \(256, 64\)"):
        small(conditions, out, init_base=str(wrong)).run()
    # An SD checkpoint that is not one (here: a CtrLoRA base file), through the command line.
    code = pretrain.main(["--checkpoint", os.path.join(tiny.GOLDEN, "base.ckpt"), "--condition",
                          f"mask={conditions[0][1]}", "--output-dir", str(out), "--resolution", "32"])
    assert code == 2 and "base.ckpt is not a Stable Diffusion checkpoint ComfyUI can load" in capsys.readouterr().err
    # Outputs are never overwritten.
    (out / "base_mask_rank4.safetensors").write_bytes(b"precious")
    with pytest.raises(CtrLoRAError, match="base_mask_rank4.safetensors already exists"):
        small(conditions, out).run()
    assert (out / "base_mask_rank4.safetensors").read_bytes() == b"precious"
    assert sorted(os.listdir(out)) == ["base_mask_rank4.safetensors"]


# --- several processes: torchrun with gloo on the CPU ---------------------------------------------------------------

CLI_STEPS = 24


def command(out, conditions, batch, *extra, nproc=None):
    launcher = [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc)] if nproc else [sys.executable]
    return launcher + [SCRIPT, "--models-from", MODELS, *conditions, "--output-dir", str(out), "--name", "base",
                       "--rank", "4", "--steps", str(CLI_STEPS), "--batch-size", str(batch), "--lr", "1e-4",
                       "--resolution", str(SIZE), "--threads", "1", *extra]


def environment():
    return {**os.environ, "COMFYUI_PATH": COMFYUI, "OMP_NUM_THREADS": "1"}


def run_cli(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=environment(), cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def output_tensors(folder):
    return {name: load(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name.endswith(".safetensors")}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The same run as 2 processes x batch 2 (torchrun, gloo) and as 1 process x batch 4 (plain python). One image of
    'mask' is corrupt; it is in the second process's shard, so that process finds it and both drop it."""
    root = tmp_path_factory.mktemp("cli")
    conditions = []
    for i, (name, render) in enumerate(RENDERS.items()):
        write_pairs(str(root / name), 8, seed=i, render=render)
        conditions += ["--condition", f"{name}={root / name}"]
    (root / "mask" / "source" / "item_0003.png").write_bytes(b"not a png")
    logs = {}
    for label, batch, nproc in (("two", 2, 2), ("one", 4, None)):
        started = time.monotonic()
        logs[label] = run_cli(command(root / label, conditions, batch, nproc=nproc))
        logs[label + " seconds"] = time.monotonic() - started
    return root, conditions, logs


def test_two_processes_train_the_weights_of_one_process_with_the_doubled_batch(cli_runs):
    """2 processes x batch 2 and 1 process x batch 4 train on the same samples per step (same condition, same pairs,
    noise, timesteps and prompt dropout), so the results agree up to float rounding: the gradients are summed in
    another order, and AdamW amplifies rounding where a gradient is near zero. Tolerance: every tensor within 2e-4
    (about 3% of the largest change a tensor made in the run, lr 1e-4 x 24 steps = 2.4e-3)."""
    root, _, logs = cli_runs
    assert "2 process(es), global batch 4" in logs["two"] and "1 process(es), global batch 4" in logs["one"]
    assert "encoding 4 pairs of 'dots' (of 8)" in logs["two"]  # process 0 encodes its shard only
    for label in ("one", "two"):
        assert "mask: 7 pairs, 1 unreadable skipped" in logs[label]
    two, one = output_tensors(root / "two"), output_tensors(root / "one")
    assert sorted(two) == sorted(one) == ["base.safetensors", "base_dots_rank4.safetensors",
                                          "base_inverted_rank4.safetensors", "base_mask_rank4.safetensors"]
    worst, moved = 0.0, 0.0
    for name in two:
        for key in two[name]:
            worst = max(worst, (two[name][key] - one[name][key]).abs().max().item())
            if "zero_convs" in key:  # start at zero: their values are how far the run moved them
                moved = max(moved, one[name][key].abs().max().item())
    print(json.dumps({"max |2 processes - 1 process|": worst, "largest zero-conv value": moved,
                      "seconds (2 processes, 1 process)": [round(logs["two seconds"], 1),
                                                           round(logs["one seconds"], 1)]}))
    assert moved > 1e-3 and worst < 2e-4


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_weights(cli_runs):
    """The 2-process run, saving every 4 steps, is killed (SIGKILL, torchrun and both workers) as soon as its first
    checkpoint exists; the same command with --resume finishes it with exactly the weights of the uninterrupted
    2-process run."""
    import psutil

    root, conditions, _ = cli_runs
    out = root / "killed"
    cmd = command(out, conditions, 2, "--save-every", "4", nproc=2)
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(), cwd=ROOT)
    state = out / "base.train" / "state.json"
    deadline = time.monotonic() + 240
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    family = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
    process.send_signal(signal.SIGKILL)
    for child in family:
        child.send_signal(signal.SIGKILL)
    process.wait()
    assert state.exists(), "no checkpoint appeared"
    saved = json.load(open(state))["step"]
    assert 4 <= saved < CLI_STEPS and not (out / "base.safetensors").exists()

    log = run_cli(cmd + ["--resume"])
    assert f"resumed at step {saved}" in log
    expected, actual = output_tensors(root / "two"), output_tensors(out)
    assert sorted(expected) == sorted(actual)
    for name in expected:
        for key in expected[name]:
            assert torch.equal(expected[name][key], actual[name][key]), (name, key)
    assert not state.exists()

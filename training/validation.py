"""Held-out pairs and their loss: the number that says whether a run is learning the condition.

A few pairs (``fraction`` of the dataset, at most ``MAX_PAIRS``, spread evenly over it) are kept out of training.
Every ``validate_every`` steps each one is scored at the same ``TIMESTEPS`` with the same noise, so two points of
the curve differ only by the weights.
"""
import dataclasses

import torch

MAX_PAIRS = 8
# Fixed points over the DDPM schedule: low, middle and high noise all count.
TIMESTEPS = (100, 300, 500, 700, 900)


def held_out_count(total, fraction):
    if fraction <= 0 or total < 2:
        return 0
    return min(MAX_PAIRS, total - 1, max(1, round(fraction * total)))


def split(data, fraction):
    """``(train, held_out)`` views of an ``EncodedDataset``; ``held_out`` is None when nothing is held out."""
    count = held_out_count(len(data), fraction)
    if not count:
        return data, None
    held = sorted({int((i + 0.5) * len(data) / count) for i in range(count)})
    kept = [i for i in range(len(data)) if i not in held]
    return subset(data, kept), subset(data, held)


def subset(data, ids):
    ids_tensor = torch.tensor(ids, dtype=torch.long)
    return dataclasses.replace(data, hints=data.hints[ids_tensor], targets=data.targets[ids_tensor],
                               prompt_ids=data.prompt_ids[ids_tensor], names=[data.names[i] for i in ids])


class Validator:
    """Scores a condition on the held-out pairs at fixed timesteps and noise."""

    def __init__(self, objective, data, seed):
        self.objective = objective
        self.data = data
        repeats = len(TIMESTEPS)
        self.timesteps = torch.tensor(TIMESTEPS, dtype=torch.long).repeat_interleave(len(data))
        self.items = torch.arange(len(data)).repeat(repeats)
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn((len(self.items), *data.targets.shape[1:]), generator=generator)

    def loss(self, condition, device, autocast, batch_size=8):
        """Mean held-out loss (a float; not finite when the model diverged)."""
        data, total = self.data, 0.0
        with torch.no_grad(), autocast():
            for start in range(0, len(self.items), batch_size):
                ids = self.items[start:start + batch_size]
                loss = self.objective.loss(
                    condition, data.hints[ids].to(device), data.targets[ids].to(device),
                    data.context_batch(data.prompt_ids[ids], device, torch.float32),
                    self.timesteps[start:start + batch_size].to(device),
                    self.noise[start:start + batch_size].to(device),
                )
                total += loss.item() * len(ids)
        return total / len(self.items)

"""Which condition and which pairs each micro-batch of the pretraining trains: a pure function of the seed and the
shape of an update, never of the number of processes.

An update (optimizer step) averages ``micro_batches`` micro-batches of ``micro_batch`` pairs each (processes x
gradient accumulation); micro-batch ``j`` of update ``s`` is the same samples whichever process computes it.
Process ``r`` with accumulation ``k`` computes ``j = r k .. r k + k - 1`` (``micro_batches_of``), so 2 processes x
accumulation 2 train on exactly the samples of 1 process x accumulation 4, and a saved run continues on another
number of processes with the same ``processes x accumulation``.

* Conditions come in rounds: each round visits every condition once, in an order shuffled per round (as the official
  ``BatchSchedulerSampler``: one single-condition batch per condition per round). ``mixed`` (the official update,
  the default): the rounds run over the micro-batches, so one update mixes conditions and each process draws its own
  condition per micro-batch. Otherwise the rounds run over the updates: every micro-batch of an update trains the
  same condition.
* Pairs: each condition's pairs are used in a fresh seeded permutation per epoch; the ``c``-th sample drawn from a
  condition is pair ``permutation(epoch = c // N)[c % N]``, ``c`` counted from the start of the run.
* Prompt dropout, timesteps and noise of a micro-batch come from a generator seeded by ``(seed, step, j)``.
"""
import functools
import hashlib

import torch


def derive_seed(*parts):
    """A 63-bit seed from any printable parts (stable across processes, machines and Python runs)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts):
    return torch.Generator().manual_seed(derive_seed(*parts))


def micro_batches_of(rank, grad_accum):
    """The micro-batch indices ``j`` process ``rank`` computes in each update."""
    return range(rank * grad_accum, (rank + 1) * grad_accum)


class Plan:
    def __init__(self, seed, sizes, micro_batch, micro_batches, mixed=True):
        """``sizes``: ``{condition: number of pairs}`` (taken in sorted order); ``micro_batch``: pairs per
        micro-batch; ``micro_batches``: micro-batches per update (processes x gradient accumulation)."""
        self.seed = seed
        self.names = sorted(sizes)
        self.sizes = dict(sizes)
        self.micro_batch = micro_batch
        self.micro_batches = micro_batches
        self.mixed = mixed

    # --- conditions ---------------------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=64)
    def _round(self, index):
        order = torch.randperm(len(self.names), generator=generator(self.seed, "round", index))
        return [self.names[i] for i in order.tolist()]

    def _unit(self, step, j):
        """The position in the sequence the condition rounds run over."""
        return step * self.micro_batches + j if self.mixed else step

    def _condition_at(self, unit):
        index, position = divmod(unit, len(self.names))
        return self._round(index)[position]

    def _uses_before(self, name, unit):
        index, position = divmod(unit, len(self.names))
        return index + (name in self._round(index)[:position])

    def condition(self, step, j):
        """The condition micro-batch ``j`` of update ``step`` (0-based) trains."""
        return self._condition_at(self._unit(step, j))

    # --- pairs --------------------------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=16)
    def _permutation(self, name, epoch):
        return torch.randperm(self.sizes[name], generator=generator(self.seed, "order", name, epoch))

    def items(self, step, j):
        """``(condition, pair indices)`` of micro-batch ``j`` of update ``step``."""
        unit = self._unit(step, j)
        name = self._condition_at(unit)
        before = self._uses_before(name, unit) * self.micro_batch
        if not self.mixed:  # every micro-batch of an update draws from the same condition
            before = before * self.micro_batches + j * self.micro_batch
        size = self.sizes[name]
        picked = []
        for c in range(before, before + self.micro_batch):
            epoch, index = divmod(c, size)
            picked.append(int(self._permutation(name, epoch)[index]))
        return name, picked

    def draws(self, step, j, num_timesteps, prompt_dropout, latent_shape):
        """``(dropped [b] bool, timesteps [b], noise [b, *latent_shape])`` of micro-batch ``j`` of update ``step``."""
        g = generator(self.seed, "draw", step, j)
        b = self.micro_batch
        dropped = torch.rand(b, generator=g) < prompt_dropout
        timesteps = torch.randint(0, num_timesteps, (b,), generator=g)
        noise = torch.randn((b, *latent_shape), generator=g)
        return dropped, timesteps, noise

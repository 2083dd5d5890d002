"""Which condition each pretraining step trains, and which pairs each process uses for it.

The plan depends on the seed, the conditions' sizes and the *global* batch only, never on the number of
processes, and it has no state besides the step:

* Conditions come in rounds: each round visits every condition once, in an order shuffled per round (the
  official ``BatchSchedulerSampler``: one single-task batch per task per round). All processes train the same
  condition in a step.
* The global batch of ``B`` (batch per process x processes) has positions ``0 .. B-1``. With ``N`` usable pairs,
  position ``p`` draws from group ``p mod G`` (``G = min(N, B)``): the pairs ``i`` with ``i mod G == p mod G``, in
  an order reshuffled each time the group is used up. Process ``r`` of ``W`` handles positions
  ``[r B/W, (r+1) B/W)`` and so needs only the pairs of its groups: its shard (disjoint shards when ``N >= B``).
* Prompt dropout, timesteps and noise are drawn for the whole global batch from a generator seeded by
  ``(seed, step)``; each process takes its slice.

So ``W`` processes with batch ``b`` train on exactly the samples of one process with batch ``W b``, and a saved
run can continue on another number of processes with the same global batch.
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


class Plan:
    def __init__(self, seed, sizes, global_batch):
        """``sizes``: ``{condition: number of usable pairs}``; conditions are taken in sorted order."""
        self.seed = seed
        self.names = sorted(sizes)
        self.sizes = dict(sizes)
        self.global_batch = global_batch

    # --- conditions ---------------------------------------------------------------------------------------------
    @functools.lru_cache(maxsize=64)
    def _round(self, index):
        order = torch.randperm(len(self.names), generator=generator(self.seed, "round", index))
        return [self.names[i] for i in order.tolist()]

    def condition(self, step):
        """The condition step ``step`` (0-based) trains."""
        index, position = divmod(step, len(self.names))
        return self._round(index)[position]

    def uses_before(self, name, step):
        """How many of the steps before ``step`` trained ``name``."""
        index, position = divmod(step, len(self.names))
        return index + (name in self._round(index)[:position])

    # --- pairs --------------------------------------------------------------------------------------------------
    def _groups(self, name):
        return min(self.sizes[name], self.global_batch)

    @functools.lru_cache(maxsize=1024)
    def _group_order(self, name, group, epoch):
        count = len(range(group, self.sizes[name], self._groups(name)))
        return torch.randperm(count, generator=generator(self.seed, "order", name, group, epoch)).tolist()

    def items(self, step, positions):
        """The pair indices (into the condition's usable pairs) of ``positions`` of the global batch at ``step``."""
        name = self.condition(step)
        uses = self.uses_before(name, step)
        groups = self._groups(name)
        picked = []
        for p in positions:
            group = p % groups
            count = len(range(group, self.sizes[name], groups))
            epoch, index = divmod(uses, count)
            picked.append(group + groups * self._group_order(name, group, epoch)[index])
        return picked

    def shard(self, name, positions):
        """Every pair index of ``name`` that ``positions`` can ever draw: a process's shard."""
        groups = self._groups(name)
        owned = {p % groups for p in positions}
        return [i for i in range(self.sizes[name]) if i % groups in owned]

    def draws(self, step, num_timesteps, prompt_dropout, latent_shape):
        """The global batch's ``(dropped [B] bool, timesteps [B], noise [B, *latent_shape])`` at ``step``."""
        g = generator(self.seed, "step", step)
        batch = self.global_batch
        dropped = torch.rand(batch, generator=g) < prompt_dropout
        timesteps = torch.randint(0, num_timesteps, (batch,), generator=g)
        noise = torch.randn((batch, *latent_shape), generator=g)
        return dropped, timesteps, noise


def positions(rank, world, global_batch):
    """The global batch positions process ``rank`` of ``world`` trains."""
    per = global_batch // world
    return range(rank * per, (rank + 1) * per)

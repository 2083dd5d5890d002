"""torch.distributed for the pretraining: one process or many, the same code path.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the processes join one process group: NCCL on CUDA,
gloo on the CPU. Each process trains on its own GPU (``LOCAL_RANK``) and its own micro-batches; gradients are
averaged by ``DistributedDataParallel``; process 0 alone writes files. Run as one process (no ``torchrun``, or
``--nproc_per_node 1``) nothing is initialised and every collective is the identity.

Collectives that follow work which can fail on one process only (reading images, writing files) go through
``exchange``: every process contributes either its result or its error, so that all of them raise the same error
instead of the healthy ones waiting forever for a process that has given up.
"""
import datetime
import os

import torch
import torch.distributed as dist

from ..ctrlora_core import CtrLoRAError


class Distributed:
    def __init__(self, rank=0, world=1, local_rank=0, backend=None):
        self.rank, self.world, self.local_rank, self.backend = rank, world, local_rank, backend

    @classmethod
    def single(cls):
        return cls()

    @classmethod
    def from_env(cls, cpu=False, timeout_s=1800):
        """The process group ``torchrun`` describes in the environment, or a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and not cpu
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world, local_rank, backend)

    @property
    def active(self):
        return self.world > 1

    @property
    def is_writer(self):
        return self.rank == 0

    def close(self):
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    # --- collectives ----------------------------------------------------------------------------------------------
    def gather(self, value):
        """``value`` of every process, by rank (any picklable object)."""
        if not self.active:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def exchange(self, work):
        """Runs ``work()`` here and returns its result once every process has run its own; if it failed on any
        process, raises on all of them (the local exception where it failed, a ``CtrLoRAError`` naming the failed
        process elsewhere). Only the success flags travel."""
        result, error, message = None, None, None
        try:
            result = work()
        except Exception as e:  # reported to every process below, then re-raised here
            error, message = e, str(e) if isinstance(e, CtrLoRAError) else f"{type(e).__name__}: {e}"
        outcomes = self.gather(message)
        if error is not None:
            raise error
        failed = [(rank, m) for rank, m in enumerate(outcomes) if m is not None]
        if failed:
            rank, message = failed[0]
            raise CtrLoRAError(f"process {rank} of {self.world} failed: {message}")
        return result

    def mean(self, value, device):
        """The mean of a float over the processes."""
        if not self.active:
            return float(value)
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world

    def barrier(self):
        if self.active:
            dist.barrier()

    def wrap(self, module, device):
        """``module`` under ``DistributedDataParallel`` (gradients averaged over the processes in the backward of
        an update's last micro-batch; the others run under ``no_sync``), or ``module`` itself on one process.
        ``find_unused_parameters``: a micro-batch trains one condition, so the other conditions' LoRAs get no
        gradient from it; DDP then reduces what the process accumulated for them in the update (zeros if nothing),
        so every process applies the same averaged gradient."""
        if not self.active:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

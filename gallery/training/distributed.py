"""Data-parallel training (docs/design.md §6): N processes, each reading its part of every batch, with
torch.distributed DistributedDataParallel averaging their gradients (NCCL on GPUs, gloo on CPU).

Metaflow launches the processes (`@parallel`); this module only needs each one's node index,
the number of nodes and the main node's address. One parallel step trains every loss weighting
at once: nodes [m·W, (m+1)·W) train model m with W workers each, in their own process group, so
the weightings train side by side as the foreach over weightings did.

Nothing waits forever on a peer (docs/cluster.md, Retries and resume): joining waits at most
RENDEZVOUS_TIMEOUT for every node, and each collective at most COLLECTIVE_TIMEOUT for its group; a peer
that died (its sockets closed) fails the others' next collective with gloo at once.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Longer than any rank spends alone between two collectives: rank 0 writing a checkpoint (the model and its
# optimiser state, to S3 on a cluster) while the others wait in the barrier, or a rank preparing its data.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
# Longer than the time between the first and the last node starting: on a cluster, pods scheduled apart.
RENDEZVOUS_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes training one model; a lone process is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    group: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """DDP around `module` when there are peers: gradients are averaged over the group in backward."""
        if self.world == 1:
            return module
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                       process_group=self.group)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place."""
        if self.world > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def share_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) on every rank. DDP broadcasts them only
        before a training forward, so after an epoch each rank holds its own last update; validation,
        checkpoints and the kept weights must see one model."""
        if self.world > 1:
            source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
            for buffer in module.buffers():
                dist.broadcast(buffer, src=source, group=self.group)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)


def master_port(run_id: str, step: str, attempt: int) -> int:
    """A port for one run's step and attempt: concurrent local runs must not meet on the same one
    (derived with SHA-1: Python's hash() differs between processes). Below Linux's ephemeral ports
    (32768-60999), which every outgoing connection takes one of: a port drawn from there was once held
    by another process's client socket, the main node could not listen, and its worker waited for it."""
    digest = hashlib.sha1(f"{run_id}/{step}/{attempt}".encode()).digest()
    return 20000 + int.from_bytes(digest[:4], "big") % 12000


def join(node: int, nodes: int, workers: int, main_ip: str, port: int, device: torch.device,
         backend: str = "gloo", timeout: timedelta = COLLECTIVE_TIMEOUT,
         rendezvous_timeout: timedelta = RENDEZVOUS_TIMEOUT) -> Ranks:
    """Join the nodes of a parallel step; return the ranks of this node's model (node // workers).
    NCCL needs a GPU of its own per rank; gloo works with CPU and CUDA tensors alike. Every node must
    join within `rendezvous_timeout` (else each raises); a collective of a model's group that waits
    longer than `timeout` raises (gloo), or NCCL's watchdog aborts it and ends the process (torch's default)."""
    if workers == 1:
        return Ranks()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://{main_ip}:{port}", rank=node, world_size=nodes,
                            timeout=rendezvous_timeout)
    groups = [dist.new_group(list(range(m * workers, (m + 1) * workers)), timeout=timeout)
              for m in range(nodes // workers)]
    return Ranks(node % workers, workers, groups[node // workers])


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

"""The package's tensor collectives, each on a device its process group has a backend for.

A process group holds one backend per device type: ``"cpu:gloo,cuda:nccl"`` runs CPU tensors on gloo and CUDA
tensors on NCCL, while a group made with ``"nccl"`` alone has no backend for a CPU tensor, and its first CPU
collective fails. The trainer keeps some small tensors on the CPU on purpose (metric sums, checkpoint gathers), so:

* :func:`process_group_backend` names a backend for every device type the run's tensors may live on, and the
  trainer initialises the world with it (``new_group`` without a backend inherits the world's string, so the TP/DP
  groups and DeepSpeed's own have the same backends);
* :func:`all_reduce`, :func:`all_gather` and :func:`broadcast` move a tensor its group cannot take to a device it
  can (and the result back), so a collective stays correct even on a group made with a narrower backend.

Every tensor collective of the package goes through this module (tests/test_collectives.py checks the source).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def process_group_backend(device_type: str) -> str:
    """The ``init_process_group`` backend for a run whose compute device type is ``device_type``.

    CPU: ``"gloo"``. CUDA: ``"cpu:gloo,cuda:nccl"``: NCCL for the model's tensors, gloo for the CPU-side ones
    (NCCL has no CPU support)."""
    if device_type == "cpu":
        return "gloo"
    if device_type == "cuda":
        return "cpu:gloo,cuda:nccl"
    raise ValueError(f"no process-group backend known for device type {device_type!r}: dflash-ds trains on cpu "
                     "(gloo) or cuda (cpu:gloo,cuda:nccl)")


def backend_device_types(backend: str) -> frozenset[str]:
    """The device types a backend string has a backend for, read as torch reads it: ``"cpu:gloo,cuda:nccl"`` ->
    {cpu, cuda}; a bare name by torch's capability table (``"nccl"`` -> {cuda}, ``"gloo"`` -> {cpu, cuda})."""
    backend = backend.lower()
    if ":" in backend:
        return frozenset(pair.split(":", 1)[0].strip() for pair in backend.split(","))
    return frozenset(dist.Backend.backend_capability.get(backend, ()))


def collective_device(tensor_device: torch.device, covered: frozenset[str], accelerator: torch.device) -> torch.device:
    """Where a tensor on ``tensor_device`` must be for a collective on a group covering the device types ``covered``:
    where it is if covered, else the accelerator (the compute device), else the CPU."""
    for device in (tensor_device, accelerator, torch.device("cpu")):
        if device.type in covered:
            return device
    raise RuntimeError(f"the process group has backends for {sorted(covered)} only: no device of this process "
                       f"({tensor_device}, {accelerator}, cpu) can take part in its collectives")


def _accelerator() -> torch.device:
    """This process's compute device (the CUDA device the trainer selected, else the CPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _group_device(tensor: torch.Tensor, group) -> torch.device:
    covered = backend_device_types(dist.get_backend_config(group))
    return collective_device(tensor.device, covered, _accelerator())


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """``tensor`` (any shape) reduced with ``op`` over ``group``, in place; returns it."""
    device = _group_device(tensor, group)
    work = tensor.contiguous().to(device)  # the tensor itself where it already fits
    dist.all_reduce(work, op=op, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on each rank), in group-rank order, on ``tensor``'s device."""
    device = _group_device(tensor, group)
    work = tensor.contiguous().to(device)
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, work, group=group)
    return [p.to(tensor.device) for p in parts]


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """``tensor`` overwritten, in place, with global rank ``src``'s; returns it."""
    device = _group_device(tensor, group)
    work = tensor.contiguous().to(device)
    dist.broadcast(work, src, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor

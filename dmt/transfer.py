"""Host-to-device copies that never make the host wait for the GPU."""
from __future__ import annotations

import torch


def to_device(host, device) -> torch.Tensor:
    """An array (numpy, or a tensor anywhere) as a tensor on `device`.

    Host to CUDA: pinned + non_blocking, since a copy from pageable memory makes the host
    wait for the whole GPU queue (the previous step included). The copy reads a pinned
    buffer of its own, which the caching host allocator keeps until the copy is done, so
    the caller may reuse `host` at once. A tensor already on a GPU moves non_blocking;
    anything else is a plain `.to`.
    """
    tensor = torch.as_tensor(host)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    if tensor.device.type != "cpu":
        return tensor.to(device, non_blocking=True)
    # pin_memory() returns an already pinned tensor itself: the async copy would then
    # read the caller's buffer after we return, so copy that one into our own.
    pinned = (torch.empty_like(tensor, pin_memory=True).copy_(tensor) if tensor.is_pinned()
              else tensor.pin_memory())
    return pinned.to(device, non_blocking=True)

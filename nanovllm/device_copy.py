import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` without waiting: through pinned memory, so the copy does
    not wait for the work already queued on the GPU (a pageable copy can), which would stall a
    step launched while the one before is still running. A tensor already on a GPU is just moved."""
    if device.type != "cuda" or not host.is_cpu:
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)

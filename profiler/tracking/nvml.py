"""Which NVML device is torch's ``cuda:N``: found by UUID, never by index alone.

``CUDA_VISIBLE_DEVICES`` renumbers devices for CUDA, while NVML's indices are
physical (PCI order); a MIG instance has a UUID of its own and no index. So
the handle is found by UUID where one is known, and the answer says how it
was found. Nothing here initialises CUDA: reading torch's device properties
would create this process's CUDA context, which would then sit in the
sampler's baseline and hide from "device used minus baseline".
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch

__all__ = ["find_handle", "nvml_devices", "torch_device_uuid"]


def torch_device_uuid(index: int) -> str | None:
    """torch's UUID for ``cuda:index``, read only if CUDA is already initialised.

    Reading device properties initialises CUDA, which creates this process's
    CUDA context on the device. Doing that here would put our own context
    into the baseline and hide it from "device used minus baseline", so when
    CUDA is not yet initialised the device is found through
    ``CUDA_VISIBLE_DEVICES`` instead (see ``find_handle``).
    """
    try:
        if not torch.cuda.is_initialized():
            return None
        return str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # no CUDA build, bad index, driver error: no UUID
        return None


def _visible_devices_entry(index: int) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` entry that CUDA index ``index`` stands for."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return None
    entries = [e.strip() for e in env.split(",") if e.strip()]
    return entries[index] if 0 <= index < len(entries) else None


def _normalise_uuid(uuid: Any) -> str:
    """UUID without its 'GPU-'/'MIG-' prefix, lower case: NVML has the prefix, torch not."""
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    text = text.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def _as_text(uuid: Any) -> str:
    return uuid.decode() if isinstance(uuid, bytes) else str(uuid)


def nvml_devices(nv: ModuleType) -> list[tuple[str, Any]]:
    """(UUID, handle) of every NVML GPU and every MIG instance on it."""
    found: list[tuple[str, Any]] = []
    for i in range(nv.nvmlDeviceGetCount()):
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            found.append((_as_text(nv.nvmlDeviceGetUUID(handle)), handle))
        except Exception:  # a GPU this process may not query (NoPermission on a shared host)
            continue
        try:
            if nv.nvmlDeviceGetMigMode(handle)[0] != 1:
                continue
            n_mig = nv.nvmlDeviceGetMaxMigDeviceCount(handle)
        except Exception:  # no MIG support, old driver, fake module
            continue
        for j in range(n_mig or 0):
            try:
                mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)
                found.append((_as_text(nv.nvmlDeviceGetUUID(mig)), mig))
            except Exception:  # empty MIG slot
                continue
    return found


def find_handle(nv: ModuleType, index: int) -> tuple[Any, str]:
    """NVML handle for torch's ``cuda:index`` and a note on how it was found.

    Order: torch's UUID (when CUDA is initialised); a UUID entry in
    ``CUDA_VISIBLE_DEVICES``; an integer entry there; the torch index
    itself. The last two assume CUDA numbers devices as NVML does (PCI
    order), which holds only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or on
    machines with identical GPUs, hence the note.
    """
    notes: list[str] = []
    torch_uuid = torch_device_uuid(index)
    if torch_uuid:
        want = _normalise_uuid(torch_uuid)
        for uuid, handle in nvml_devices(nv):
            if _normalise_uuid(uuid) == want:
                return handle, f"uuid {uuid} (torch device properties)"
        notes.append(f"no NVML UUID matched torch's {torch_uuid!r}")
    else:
        notes.append("torch UUID not read (CUDA not initialised)")

    entry = _visible_devices_entry(index)
    if entry is not None and entry.lower().startswith(("gpu-", "mig-")):
        # CUDA accepts a unique prefix of a UUID, so match on prefix.
        matches = [(uuid, handle) for uuid, handle in nvml_devices(nv) if uuid.lower().startswith(entry.lower())]
        if len(matches) == 1:
            uuid, handle = matches[0]
            return handle, f"uuid {uuid} (CUDA_VISIBLE_DEVICES)"
        notes.append(f"CUDA_VISIBLE_DEVICES entry {entry!r} matched {len(matches)} NVML devices")
    elif entry is not None and entry.isdigit():
        nvml_index = int(entry)
        notes.append(f"CUDA_VISIBLE_DEVICES entry {entry!r}; assumes CUDA and NVML order agree")
        return nv.nvmlDeviceGetHandleByIndex(nvml_index), (f"index {nvml_index} ({'; '.join(notes)})")

    notes.append("CUDA_VISIBLE_DEVICES may remap indices, so this may be another GPU")
    return nv.nvmlDeviceGetHandleByIndex(index), f"index {index} ({'; '.join(notes)})"

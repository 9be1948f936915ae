"""GPU utilisation and memory in use, through NVML (nvidia-ml-py), for the GPU this process's torch uses.

NVML and CUDA number GPUs differently: NVML by PCI bus id, CUDA fastest-first unless CUDA_DEVICE_ORDER is
PCI_BUS_ID, and CUDA_VISIBLE_DEVICES renumbers (it may list indices, GPU UUIDs, MIG UUIDs, or unique UUID
prefixes). So the device is found by what both agree on: its UUID (torch's device properties), else its
PCI bus id, else the CUDA_VISIBLE_DEVICES entry read as NVML understands it. When none gives an answer the
monitor says why (`GpuMonitor.unavailable`, a note in the report) and every reading is None (`n/a`).
"""

from __future__ import annotations

import os
from typing import Any

UUID_PREFIXES = ("GPU-", "MIG-")


class GpuLookupError(LookupError):
    """The NVML device of a CUDA device could not be found; the message names what was tried."""


def nvml_handle(
    nvml: Any,
    *,
    cuda_index: int,
    cuda_uuid: str | None,
    pci_bus_id: str | None,
    visible: str | None,
    device_order: str | None,
) -> Any:
    """The NVML handle of CUDA device `cuda_index` (this process's numbering).

    cuda_uuid: torch's `get_device_properties(i).uuid` as text (no prefix). pci_bus_id: `DDDDDDDD:BB:DD.0`.
    visible: $CUDA_VISIBLE_DEVICES. device_order: $CUDA_DEVICE_ORDER.
    """
    if cuda_uuid:
        for prefix in UUID_PREFIXES:
            try:
                return nvml.nvmlDeviceGetHandleByUUID(prefix + cuda_uuid)
            except nvml.NVMLError:
                continue
    if pci_bus_id:
        try:
            return nvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
        except nvml.NVMLError:
            pass
    entries = [e.strip() for e in visible.split(",")] if visible else None
    if entries is not None:
        if cuda_index >= len(entries):
            raise GpuLookupError(f"CUDA device {cuda_index} is beyond CUDA_VISIBLE_DEVICES={visible!r}")
        entry = entries[cuda_index]
        if entry.startswith(UUID_PREFIXES):
            return _handle_by_uuid_prefix(nvml, entry, visible)
        if not entry.isdigit():
            raise GpuLookupError(f"CUDA_VISIBLE_DEVICES entry {entry!r} is neither an index nor a GPU-/MIG- UUID")
        index = int(entry)
    else:
        index = cuda_index
    # a bare index names the same GPU in NVML only when CUDA also counts by PCI bus id (or there is one GPU)
    if device_order != "PCI_BUS_ID" and nvml.nvmlDeviceGetCount() > 1:
        raise GpuLookupError(
            f"CUDA device {cuda_index} has no UUID or PCI bus id NVML knows, and CUDA's index order is not NVML's "
            "(set CUDA_DEVICE_ORDER=PCI_BUS_ID, or list GPU UUIDs in CUDA_VISIBLE_DEVICES)"
        )
    try:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError as err:
        raise GpuLookupError(f"NVML has no GPU {index} (CUDA_VISIBLE_DEVICES={visible!r}): {err}") from err


def _handle_by_uuid_prefix(nvml: Any, entry: str, visible: str) -> Any:
    """CUDA accepts any unique prefix of a UUID in CUDA_VISIBLE_DEVICES; NVML wants the whole UUID."""
    try:
        return nvml.nvmlDeviceGetHandleByUUID(entry)
    except nvml.NVMLError:
        pass
    matches = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = nvml.nvmlDeviceGetUUID(handle)
        if (uuid.decode() if isinstance(uuid, bytes) else uuid).startswith(entry):
            matches.append(handle)
    if len(matches) != 1:
        what = "no GPU" if not matches else f"{len(matches)} GPUs"
        raise GpuLookupError(f"CUDA_VISIBLE_DEVICES entry {entry!r} ({visible!r}) matches {what} NVML lists")
    return matches[0]


def torch_device_ids(index: int) -> tuple[str | None, str | None]:
    """(UUID text, PCI bus id `DDDDDDDD:BB:DD.0`) of CUDA device `index` from torch, None where unknown."""
    import torch

    props = torch.cuda.get_device_properties(index)
    uuid = str(props.uuid) if getattr(props, "uuid", None) is not None else None
    pci = None
    if getattr(props, "pci_bus_id", None) is not None:
        pci = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    return uuid, pci


class GpuMonitor:
    """Utilisation and memory of this process's GPU; readings are None without a GPU, without NVML, or when
    the device cannot be found (`unavailable` then says why)."""

    def __init__(self, device: Any, *, nvml: Any = None) -> None:
        self._handle: Any = None  # NVML device handle; None: every reading is n/a
        self._nvml: Any = None  # the pynvml module (or a stand-in)
        self.unavailable: str | None = None  # why readings are n/a on a CUDA device, for the report's notes
        if getattr(device, "type", "cpu") != "cuda":
            return
        index = device.index if device.index is not None else 0
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
        except Exception as err:  # no NVML library or driver: a note, not a failed profile
            self.unavailable = f"NVML unavailable ({type(err).__name__}: {err}): GPU utilisation is n/a"
            return
        self._nvml = nvml
        try:
            uuid, pci = torch_device_ids(index)
            self._handle = nvml_handle(nvml, cuda_index=index, cuda_uuid=uuid, pci_bus_id=pci,
                                       visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
                                       device_order=os.environ.get("CUDA_DEVICE_ORDER"))
        except GpuLookupError as err:
            self.unavailable = f"GPU utilisation is n/a: {err}"
            nvml.nvmlShutdown()

    def utilization(self) -> float | None:
        """Percent of the last NVML sample period (1/6 s to 1 s) in which a kernel was running; MIG devices
        have no such counter (None, with a note)."""
        if self._handle is None:
            return None
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
        except self._nvml.NVMLError as err:
            self.unavailable = f"NVML gives no utilisation for this device ({err}); a MIG instance has none"
            return None

    def memory_used_gib(self) -> float | None:
        if self._handle is None:
            return None
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**30

    def close(self) -> None:
        if self._handle is not None:
            self._nvml.nvmlShutdown()
            self._handle = None

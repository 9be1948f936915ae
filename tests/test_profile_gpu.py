"""The GPU monitor finds the NVML device of this process's CUDA device however CUDA_VISIBLE_DEVICES names it
(index, GPU UUID, MIG UUID, UUID prefix) and whatever order CUDA counts in; when it cannot, it says why.
A fake NVML stands in for the driver: four GPUs whose NVML order (PCI bus) is not CUDA's."""

from __future__ import annotations

import types

import pytest

from tools.profiler import gpu
from tools.profiler.gpu import GpuLookupError, GpuMonitor, nvml_handle

# NVML index -> (UUID, PCI bus id). CUDA's default order (fastest first) differs from NVML's.
DEVICES = [
    ("GPU-0a0a0a0a-1111-2222-3333-444444444444", "00000000:17:00.0"),
    ("GPU-1b1b1b1b-1111-2222-3333-444444444444", "00000000:3B:00.0"),
    ("GPU-1b2c2c2c-1111-2222-3333-444444444444", "00000000:86:00.0"),
    ("MIG-3d3d3d3d-1111-2222-3333-444444444444", "00000000:AF:00.0"),  # a MIG instance
]


class FakeNVML:
    """The pynvml calls the monitor makes; a handle is the device's NVML index."""

    class NVMLError(Exception):
        pass

    def __init__(self, *, utilisation_supported: bool = True) -> None:
        self.calls: list[str] = []
        self.utilisation_supported = utilisation_supported

    def nvmlInit(self) -> None:
        self.calls.append("init")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(DEVICES)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(DEVICES):
            raise self.NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        for index, (known, _) in enumerate(DEVICES):
            if known == uuid:
                return index
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetHandleByPciBusId(self, bus: str) -> int:
        for index, (_, known) in enumerate(DEVICES):
            if known.lower() == bus.lower():
                return index
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return DEVICES[handle][0]

    def nvmlDeviceGetUtilizationRates(self, handle: int):
        if not self.utilisation_supported:
            raise self.NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=10 * (handle + 1))

    def nvmlDeviceGetMemoryInfo(self, handle: int):
        return types.SimpleNamespace(used=(handle + 1) * 2**30)


def lookup(*, index=0, uuid=None, pci=None, visible=None, order=None) -> int:
    return nvml_handle(FakeNVML(), cuda_index=index, cuda_uuid=uuid, pci_bus_id=pci, visible=visible,
                       device_order=order)


def test_torch_uuid_finds_the_device_whatever_the_visible_list_says():
    # CUDA device 0 of CUDA_VISIBLE_DEVICES=2,1 is NVML's 2 only by UUID; int(visible[0]) would be right here
    # by luck and wrong under CUDA's fastest-first order. The UUID is right either way.
    assert lookup(index=0, uuid=DEVICES[2][0][4:], visible="2,1") == 2
    assert lookup(index=1, uuid=DEVICES[1][0][4:], visible="2,1") == 1
    assert lookup(uuid=DEVICES[3][0][4:]) == 3  # a MIG instance: NVML knows it as MIG-<uuid>


def test_pci_bus_id_when_torch_gives_no_uuid():
    assert lookup(pci="00000000:86:00.0", visible="1,0") == 2


@pytest.mark.parametrize("visible, index, expected", [
    ("GPU-1b1b1b1b-1111-2222-3333-444444444444", 0, 1),  # a whole UUID
    ("MIG-3d3d3d3d-1111-2222-3333-444444444444", 0, 3),  # a MIG UUID
    ("GPU-0a0a,GPU-1b2c", 1, 2),  # unique prefixes, as CUDA accepts them
])
def test_visible_uuid_entries(visible, index, expected):
    assert lookup(index=index, visible=visible) == expected


def test_visible_indices_only_when_cuda_counts_like_nvml():
    assert lookup(index=1, visible="3,0", order="PCI_BUS_ID") == 0
    assert lookup(index=2, order="PCI_BUS_ID") == 2  # no CUDA_VISIBLE_DEVICES
    with pytest.raises(GpuLookupError, match="CUDA's index order is not NVML's .set CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        lookup(index=0, visible="3,0")


@pytest.mark.parametrize("visible, index, message", [
    ("GPU-1b", 0, "'GPU-1b' .'GPU-1b'. matches 2 GPUs NVML lists"),  # ambiguous prefix
    ("GPU-ffff", 0, "matches no GPU NVML lists"),
    ("0,1", 2, "CUDA device 2 is beyond CUDA_VISIBLE_DEVICES='0,1'"),
    ("gpu0", 0, "entry 'gpu0' is neither an index nor a GPU-/MIG- UUID"),
    ("7", 0, "NVML has no GPU 7"),
])
def test_what_cannot_be_resolved_is_an_error_that_says_why(visible, index, message):
    with pytest.raises(GpuLookupError, match=message):
        lookup(index=index, visible=visible, order="PCI_BUS_ID")


def test_monitor_reads_the_resolved_device_and_notes_what_it_cannot(monkeypatch):
    cuda1 = types.SimpleNamespace(type="cuda", index=1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1b2c,GPU-0a0a")
    monkeypatch.setattr(gpu, "torch_device_ids", lambda index: (None, None))
    monitor = GpuMonitor(cuda1, nvml=FakeNVML())
    assert (monitor.utilization(), monitor.memory_used_gib(), monitor.unavailable) == (10.0, 1.0, None)
    monitor.close()

    mig = FakeNVML(utilisation_supported=False)
    monkeypatch.setattr(gpu, "torch_device_ids", lambda index: (DEVICES[3][0][4:], None))
    monitor = GpuMonitor(cuda1, nvml=mig)
    assert monitor.utilization() is None and monitor.memory_used_gib() == 4.0
    assert monitor.unavailable.startswith("NVML gives no utilisation for this device (Not Supported)")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.setattr(gpu, "torch_device_ids", lambda index: (None, None))
    nvml = FakeNVML()
    monitor = GpuMonitor(cuda1, nvml=nvml)
    assert monitor.utilization() is None and monitor.memory_used_gib() is None
    assert monitor.unavailable.startswith("GPU utilisation is n/a: CUDA device 1 has no UUID or PCI bus id")
    assert nvml.calls == ["init", "shutdown"]
    assert GpuMonitor(types.SimpleNamespace(type="cpu", index=None)).unavailable is None  # no GPU: nothing to say

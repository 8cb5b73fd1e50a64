"""GPU health through NVML (nvidia-ml-py): XID events, ECC errors, throttle reasons, temperature.

Why: C4 attributes most hangs and slowdowns to faulty hardware; NVML names the
GPU directly when it knows (an XID error, uncorrectable ECC, thermal or power
throttling), which the collective pattern can only infer. The publisher polls
`poll()` every few seconds from its side thread and ships the events in its
state; the detector turns them into findings (`gpu_xid`, `gpu_ecc`,
`gpu_throttle`, `gpu_temperature`). Without a GPU or without the package it
says so once and every poll returns nothing.
"""
from __future__ import annotations

import itertools
from typing import Callable

_ids = itertools.count(1)

# Throttle reasons that mean trouble (idle / application clocks are normal).
_BAD_THROTTLE = {
    "HW_SLOWDOWN": 0x8, "SW_THERMAL": 0x20, "HW_THERMAL": 0x40, "HW_POWER_BRAKE": 0x80,
}


class GpuHealth:
    """Polls one GPU (the rank's local device index)."""

    def __init__(self, index: int, log: Callable[[str], None], temp_limit_c: int = 90):
        self.index, self.log, self.temp_limit_c = index, log, temp_limit_c
        self.available = False
        self._nvml = None
        self._events = None
        self._last_ecc = 0
        self._last_throttle = 0
        try:
            import pynvml  # nvidia-ml-py
        except ImportError:
            self.log("C4: GPU health checks off: nvidia-ml-py is not installed (pip install 'dist-train[nvml]')")
            return
        try:
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as e:
            self.log(f"C4: GPU health checks off: NVML unavailable ({e})")
            return
        self._nvml = pynvml
        self.available = True
        try:
            self._events = pynvml.nvmlEventSetCreate()
            pynvml.nvmlDeviceRegisterEvents(self._handle, pynvml.nvmlEventTypeXidCriticalError, self._events)
        except pynvml.NVMLError:
            self._events = None  # not supported on this device / driver

    def _event(self, kind: str, **evidence) -> dict:
        return {"kind": kind, "id": next(_ids), "gpu": self.index, **evidence}

    def poll(self) -> list[dict]:
        if not self.available:
            return []
        nv, h, out = self._nvml, self._handle, []
        if self._events is not None:
            try:
                ev = nv.nvmlEventSetWait_v2(self._events, 0)
                out.append(self._event("gpu_xid", xid=int(ev.eventData)))
            except nv.NVMLError:
                pass  # timeout: no event
        try:
            ecc = nv.nvmlDeviceGetTotalEccErrors(h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)
            if ecc > self._last_ecc:
                out.append(self._event("gpu_ecc", uncorrected=int(ecc), new=int(ecc - self._last_ecc)))
            self._last_ecc = ecc
        except nv.NVMLError:
            pass
        try:
            reasons = nv.nvmlDeviceGetCurrentClocksEventReasons(h)
            bad = [n for n, bit in _BAD_THROTTLE.items() if reasons & bit]
            if bad and reasons != self._last_throttle:
                out.append(self._event("gpu_throttle", reasons=bad))
            self._last_throttle = reasons
        except (nv.NVMLError, AttributeError):
            pass
        try:
            t = nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)
            if t >= self.temp_limit_c:
                out.append(self._event("gpu_temperature", celsius=int(t), limit=self.temp_limit_c))
        except nv.NVMLError:
            pass
        return out


def gpu_health(index: int, cuda: bool, log: Callable[[str], None]) -> GpuHealth | None:
    """A poller for this rank's GPU, or None on a CPU job (said once by the caller's rank)."""
    if not cuda:
        log("C4: GPU health checks off: no GPU in this job (NVML unavailable)")
        return None
    h = GpuHealth(index, log)
    return h if h.available else None

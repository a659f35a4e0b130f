"""GPU telemetry through NVML (nvidia-ml-py, the `runtime` extra): per device its name,
memory, SM clock, power and utilisation, sampled while bench, serve and profile run.

Without NVML (a CPU machine, no driver, the package missing) telemetry is simply
absent: `Telemetry.devices` is empty, `sample()` returns [], a `Sampler` records
nothing and its summary is {}. Never an error. A field one device cannot report
(e.g. power on some boards) is None.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence


@dataclass(frozen=True, slots=True)
class DeviceSample:
    index: int                  # NVML index
    name: str
    memory_used_mib: float | None
    memory_total_mib: float | None
    sm_clock_mhz: float | None
    power_w: float | None
    gpu_util_pct: float | None
    memory_util_pct: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load_nvml() -> Any | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def visible_indices(count: int, env: str | None = None) -> list[int]:
    """NVML indices of the GPUs this process sees: CUDA_VISIBLE_DEVICES when it lists
    plain indices (the ones torch calls cuda:0, cuda:1, ...), else all of them."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES") if env is None else env
    if env is None or env.strip() == "":
        return list(range(count)) if env is None else []
    parts = [p.strip() for p in env.split(",")]
    if not all(p.isdigit() for p in parts):   # UUIDs / MIG names: cannot map, take all
        return list(range(count))
    return [int(p) for p in parts if int(p) < count]


def _uuid_indices(nvml: Any, count: int) -> list[int] | None:
    """NVML indices of CUDA_VISIBLE_DEVICES when it names GPUs by UUID (or a UUID's
    prefix, as CUDA accepts; containers often do), mixed with plain indices or not;
    None when it lists none, or something that cannot be mapped (MIG instances)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    parts = [p.strip() for p in env.split(",") if p.strip()]
    if not any(p.startswith("GPU-") for p in parts):
        return None
    uuids = []
    try:
        for i in range(count):
            u = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))
            uuids.append(u.decode() if isinstance(u, bytes) else str(u))
    except Exception:   # an NVML without UUIDs: as before, every device
        return None
    out = []
    for p in parts:
        if p.isdigit() and int(p) < count:
            out.append(int(p))
            continue
        hits = [i for i, u in enumerate(uuids) if p.startswith("GPU-") and u.startswith(p)]
        if len(hits) != 1:
            return None
        out.append(hits[0])
    return out


class Telemetry:
    """NVML handles of some devices (default: the visible ones, in cuda:i order);
    `cuda_indices` picks some of those (e.g. the stages' devices)."""

    def __init__(self, cuda_indices: Sequence[int] | None = None, nvml: Any | None = None) -> None:
        self.nvml = nvml if nvml is not None else _load_nvml()
        self.devices: list[tuple[int, Any, str]] = []   # (nvml index, handle, name)
        if cuda_indices is not None and not list(cuda_indices):
            self.nvml = None     # no device asked for (a CPU run): do not touch NVML
        if self.nvml is None:
            return
        try:
            self.nvml.nvmlInit()
            count = self.nvml.nvmlDeviceGetCount()
            visible = _uuid_indices(self.nvml, count) or visible_indices(count)
            chosen = visible if cuda_indices is None else [visible[i] for i in cuda_indices
                                                           if 0 <= i < len(visible)]
            for i in chosen:
                h = self.nvml.nvmlDeviceGetHandleByIndex(i)
                name = self.nvml.nvmlDeviceGetName(h)
                self.devices.append((i, h, name.decode() if isinstance(name, bytes) else str(name)))
        except Exception:  # no driver, no device: absent, never an error
            self.devices = []
            self.nvml = None

    @property
    def available(self) -> bool:
        return bool(self.devices)

    def _read(self, fn, *args) -> Any | None:
        try:
            return fn(*args)
        except Exception:
            return None

    def sample(self) -> list[DeviceSample]:
        out = []
        nv = self.nvml
        for i, h, name in self.devices:
            mem = self._read(nv.nvmlDeviceGetMemoryInfo, h)
            clock = self._read(nv.nvmlDeviceGetClockInfo, h, getattr(nv, "NVML_CLOCK_SM", 1))
            power = self._read(nv.nvmlDeviceGetPowerUsage, h)      # milliwatts
            util = self._read(nv.nvmlDeviceGetUtilizationRates, h)
            out.append(DeviceSample(
                i, name,
                None if mem is None else mem.used / 2**20,
                None if mem is None else mem.total / 2**20,
                None if clock is None else float(clock),
                None if power is None else power / 1000.0,
                None if util is None else float(util.gpu),
                None if util is None else float(util.memory)))
        return out

    def info(self) -> list[dict[str, Any]]:
        """Static facts for a table's meta: name and total memory per device."""
        return [{"index": s.index, "name": s.name, "memory_total_mib": s.memory_total_mib}
                for s in self.sample()]

    def close(self) -> None:
        if self.nvml is not None and self.devices:
            self._read(self.nvml.nvmlShutdown)
        self.devices = []


class Sampler:
    """Samples `telemetry` every `interval_s` on a daemon thread between start() and
    stop() (or as a context manager); summary() reduces the samples per device."""

    def __init__(self, telemetry: Telemetry, interval_s: float = 0.5) -> None:
        if interval_s <= 0:
            raise ValueError(f"telemetry interval_s must be > 0, got {interval_s}")
        self.telemetry = telemetry
        self.interval_s = interval_s
        self.samples: list[tuple[float, list[DeviceSample]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        """Take one sample now (the thread calls this; tests call it directly)."""
        if self.telemetry.available:
            self.samples.append((time.monotonic(), self.telemetry.sample()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval_s)

    def start(self) -> "Sampler":
        if self.telemetry.available and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="pipetwin-telemetry",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per device ("gpu0", ...): name, samples, peak memory used, mean and max SM
        clock, mean and max power, mean GPU and memory utilisation. {} when absent."""
        per: dict[int, list[DeviceSample]] = {}
        for _, ss in self.samples:
            for s in ss:
                per.setdefault(s.index, []).append(s)
        out = {}
        for i, ss in sorted(per.items()):
            def vals(field: str) -> list[float]:
                return [getattr(s, field) for s in ss if getattr(s, field) is not None]

            def mean(field: str) -> float | None:
                v = vals(field)
                return sum(v) / len(v) if v else None

            def peak(field: str) -> float | None:
                v = vals(field)
                return max(v) if v else None

            out[f"gpu{i}"] = {
                "name": ss[0].name, "samples": len(ss),
                "memory_used_mib_max": peak("memory_used_mib"),
                "memory_total_mib": peak("memory_total_mib"),
                "sm_clock_mhz_mean": mean("sm_clock_mhz"), "sm_clock_mhz_max": peak("sm_clock_mhz"),
                "power_w_mean": mean("power_w"), "power_w_max": peak("power_w"),
                "gpu_util_pct_mean": mean("gpu_util_pct"),
                "memory_util_pct_mean": mean("memory_util_pct"),
            }
        return out


def stage_gpus(opts: Any) -> list[int]:
    """The cuda:i indices a pipeline's stages run on (runtime.EngineConfig `opts`); [] on CPU."""
    if opts is None or getattr(opts, "device", "cpu") == "cpu":
        return []
    return sorted({int(opts.stage_device(s).split(":")[1]) for s in range(opts.pp)})


_GAUGES = (  # DeviceSample field, Prometheus name, help, scale
    ("memory_used_mib", "pipetwin_gpu_memory_used_bytes", "GPU memory in use (NVML)", 2**20),
    ("memory_total_mib", "pipetwin_gpu_memory_total_bytes", "GPU memory in all (NVML)", 2**20),
    ("sm_clock_mhz", "pipetwin_gpu_sm_clock_mhz", "SM clock (NVML)", 1),
    ("power_w", "pipetwin_gpu_power_watts", "Board power draw (NVML)", 1),
    ("gpu_util_pct", "pipetwin_gpu_utilization_ratio", "Time a kernel ran over the last sample period", 0.01),
    ("memory_util_pct", "pipetwin_gpu_memory_utilization_ratio",
     "Time device memory was read or written over the last sample period", 0.01),
)


class PrometheusCollector:
    """A prometheus_client collector: GPU gauges read from NVML at scrape time, one series
    per device (labels gpu = NVML index, name). Nothing when telemetry is absent."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def collect(self):  # noqa: ANN201 - prometheus_client collector protocol
        from prometheus_client.core import GaugeMetricFamily
        samples = self.telemetry.sample()
        for field, name, help_text, scale in _GAUGES:
            fam = GaugeMetricFamily(name, help_text, labels=["gpu", "name"])
            for s in samples:
                v = getattr(s, field)
                if v is not None:
                    fam.add_metric([str(s.index), s.name], v * scale)
            if fam.samples:
                yield fam

"""Device telemetry: absent without NVML (never an error), and the sampling logic on a
fake NVML object."""
from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import pytest

from runtime import telemetry
from runtime.telemetry import Sampler, Telemetry


class NVMLError(Exception):
    pass


class FakeNVML:
    """Two GPUs; power unsupported on the second; each reading steps the clock."""
    NVML_CLOCK_SM = 1

    def __init__(self, count=2, fail_init=False):
        self.count, self.fail_init = count, fail_init
        self.clock = 1000
        self.shutdowns = 0

    def nvmlInit(self):
        if self.fail_init:
            raise NVMLError("Driver Not Loaded")

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("h", i)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200" if h[1] == 0 else "NVIDIA H100"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=(h[1] + 1) * 2**30, total=140 * 2**30)

    def nvmlDeviceGetClockInfo(self, h, kind):
        assert kind == self.NVML_CLOCK_SM
        self.clock += 100
        return self.clock

    def nvmlDeviceGetPowerUsage(self, h):
        if h[1] == 1:
            raise NVMLError("Not Supported")
        return 350_500

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=90 - 10 * h[1], memory=40)


def test_absent_without_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)     # the package missing
    t = Telemetry()
    assert not t.available and t.sample() == [] and t.info() == []
    s = Sampler(t, interval_s=0.01).start()
    s.tick()
    s.stop()
    assert s.samples == [] and s.summary() == {}
    t.close()


def test_absent_when_the_driver_fails():
    t = Telemetry(nvml=FakeNVML(fail_init=True))
    assert not t.available and t.sample() == []


def test_samples_and_summary(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nv = FakeNVML()
    t = Telemetry(nvml=nv)
    assert [name for _, _, name in t.devices] == ["NVIDIA H200", "NVIDIA H100"]
    s = Sampler(t)
    for _ in range(3):
        s.tick()
    summ = s.summary()
    assert list(summ) == ["gpu0", "gpu1"]
    g0, g1 = summ["gpu0"], summ["gpu1"]
    assert g0["samples"] == 3 and g0["memory_used_mib_max"] == 1024 and g1["memory_used_mib_max"] == 2048
    assert g0["memory_total_mib"] == 140 * 1024
    # clock readings alternate devices: gpu0 1100, 1300, 1500; gpu1 1200, 1400, 1600
    assert g0["sm_clock_mhz_mean"] == 1300 and g1["sm_clock_mhz_max"] == 1600
    assert g0["power_w_mean"] == pytest.approx(350.5) and g1["power_w_mean"] is None
    assert g0["gpu_util_pct_mean"] == 90 and g1["gpu_util_pct_mean"] == 80
    assert t.info()[1] == {"index": 1, "name": "NVIDIA H100", "memory_total_mib": 140 * 1024}
    t.close()
    assert nv.shutdowns == 1 and not t.available


def test_stage_devices_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    t = Telemetry(cuda_indices=[0], nvml=FakeNVML())
    assert [(i, n) for i, _, n in t.devices] == [(1, "NVIDIA H100")]
    assert telemetry.visible_indices(4, "2,0") == [2, 0]
    assert telemetry.visible_indices(4, "GPU-abc") == [0, 1, 2, 3]
    assert telemetry.visible_indices(4, "") == []


def test_sampler_thread_collects(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    t = Telemetry(nvml=FakeNVML(count=1))
    with Sampler(t, interval_s=0.001) as s:
        while len(s.samples) < 3:
            time.sleep(0.001)
    n = len(s.samples)
    assert s.summary()["gpu0"]["samples"] == n >= 3
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        Sampler(t, interval_s=0)


def test_prometheus_gauges(monkeypatch):
    prometheus_client = pytest.importorskip("prometheus_client")
    from runtime.telemetry import PrometheusCollector
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    reg = prometheus_client.CollectorRegistry()
    reg.register(PrometheusCollector(Telemetry(nvml=FakeNVML())))
    text = prometheus_client.generate_latest(reg).decode()
    assert 'pipetwin_gpu_memory_used_bytes{gpu="1",name="NVIDIA H100"} 2.147483648e+09' in text
    assert 'pipetwin_gpu_power_watts{gpu="0",name="NVIDIA H200"} 350.5' in text
    assert 'pipetwin_gpu_power_watts{gpu="1"' not in text          # unsupported: no series
    assert 'pipetwin_gpu_utilization_ratio{gpu="1",name="NVIDIA H100"} 0.8' in text
    empty = prometheus_client.CollectorRegistry()
    empty.register(PrometheusCollector(Telemetry(nvml=FakeNVML(fail_init=True))))
    assert "pipetwin_gpu" not in prometheus_client.generate_latest(empty).decode()


def test_stage_gpus():
    from runtime.telemetry import stage_gpus
    assert stage_gpus(None) == [] and stage_gpus(SimpleNamespace(device="cpu")) == []
    opts = SimpleNamespace(device="cuda", pp=3, stage_device=lambda s: f"cuda:{2 - s}")
    assert stage_gpus(opts) == [0, 1, 2]
    shared = SimpleNamespace(device="cuda", pp=2, stage_device=lambda s: "cuda:0")
    assert stage_gpus(shared) == [0]
    assert Telemetry(cuda_indices=[], nvml=FakeNVML()).devices == []   # CPU run: NVML untouched


def test_cuda_visible_devices_by_uuid(monkeypatch):
    """Containers often name the GPU by UUID (or a prefix of it): the telemetry follows
    that device, not every GPU NVML sees; what cannot be mapped (MIG) takes them all."""
    class UUIDNVML(FakeNVML):
        def nvmlDeviceGetUUID(self, h):
            return f"GPU-{h[1]}aaa-{h[1]}" if h[1] else b"GPU-0aaa-0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1aaa-1")
    t = Telemetry(nvml=UUIDNVML())
    assert [(i, n) for i, _, n in t.devices] == [(1, "NVIDIA H100")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1aa,GPU-0aaa-0")   # a prefix, then a full UUID
    assert [i for i, _, _ in Telemetry(cuda_indices=[1], nvml=UUIDNVML()).devices] == [0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-5c4b")
    assert [i for i, _, _ in Telemetry(nvml=UUIDNVML()).devices] == [0, 1]

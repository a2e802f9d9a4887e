"""Peak memory of a benchmark worker: the host's resident set (VmHWM, reset per measurement) and a
GPU's per-process memory as nvidia-smi reports it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading


def _status_mb(field_name: str) -> float | None:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    return None


def host_peak_mb() -> float | None:
    """This process's peak resident set since start or the last ``reset_host_peak`` (MB)."""
    peak = _status_mb("VmHWM")
    if peak is None:
        with contextlib.suppress(ImportError):
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
    return peak


def reset_host_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class NvidiaSmiPeak:
    """The peak GPU memory of this process as nvidia-smi reports it, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.1):
        self.exe = shutil.which("nvidia-smi")
        self.interval = interval
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread = None

    def _sample(self) -> float | None:
        try:
            out = subprocess.run([self.exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            pid, _, used = line.partition(",")
            if pid.strip() == str(os.getpid()) and used.strip().isdigit():
                return float(used)
        return None

    def _loop(self):
        while not self._stop.is_set():
            mb = self._sample()
            if mb is not None:
                self.peak_mb = max(self.peak_mb or 0.0, mb)
            self._stop.wait(self.interval)

    def start(self):
        if self.exe:
            self.peak_mb, self._stop = None, threading.Event()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def stop(self) -> float | None:
        if self._thread:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.peak_mb

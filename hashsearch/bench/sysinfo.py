"""What a benchmark ran on, recorded next to its numbers (timings mean little without it)."""
from __future__ import annotations

import os
import platform
import resource
import sys


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _proc_status() -> dict:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
    except OSError:
        return {}


def descendant_pids(pid: int) -> set[int]:
    """Every process below `pid` (children, theirs, ...), from /proc; empty where there is no /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return set()
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    VmHWM where there is one: Linux's ru_maxrss carries over the parent's peak
    into a child started by fork or vfork + exec, so a small child started by
    a big parent would report the parent's size.
    """
    hwm = _proc_status().get("VmHWM")
    if hwm:
        return int(hwm.split()[0]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024    # macOS: bytes, else KiB


def rss_breakdown_mb() -> dict:
    """Current resident memory split into anonymous and file-backed (page cache mapped in), in MiB."""
    status = _proc_status()
    return {key.lower(): int(status[key].split()[0]) / 1024
            for key in ("VmRSS", "RssAnon", "RssFile") if key in status}


def machine_info() -> dict:
    import faiss
    import h5py
    import numpy

    ram = _ram_bytes()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(ram / (1 << 30), 1) if ram else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "faiss": getattr(faiss, "__version__", "?"),
        "faiss_options": faiss.get_compile_options().strip(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "h5py": h5py.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }

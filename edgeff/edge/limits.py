"""What this process may use, and a one-line refusal before work that will not fit.

The limit is the tightest of: the cgroup's ``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1) against the
resident set, the address-space rlimit (``RLIMIT_AS``) against the virtual size, and the kernel's
``MemAvailable`` added to what the process already holds. ``check_fits`` compares it with the numpy runtime's
plan (``edgeff.edge.plan``) of the work about to start, so a run that would be killed halfway ("Killed", a
``MemoryError``) is refused before it begins, naming both figures.
"""

from __future__ import annotations

import resource
from pathlib import Path

from edgeff.errors import InputError

MiB = 1 << 20
UNLIMITED = 1 << 62


def _status(field: str) -> int:
    """A ``/proc/self/status`` figure in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cgroup_limit() -> int:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return UNLIMITED


def _available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return UNLIMITED


def headroom() -> tuple[int, str]:
    """Bytes this process may still take, and where the limit comes from."""
    rss, vsize = _status("VmRSS"), _status("VmSize")
    options = [(_cgroup_limit() - rss, "the cgroup's memory limit"), (_available(), "the memory the system has free")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        options.append((soft - vsize, "the address-space limit (ulimit -v)"))
    return min(options)


def check_fits(need: int, what: str) -> None:
    """Raise ``InputError`` (one line) when ``need`` more bytes will not fit in what this process may use."""
    room, source = headroom()
    if need > room:
        raise InputError(f"{what} needs about {need / MiB:.1f} MiB more, but this process may take only "
                         f"{max(room, 0) / MiB:.1f} MiB more ({source}); use a smaller --batch-size or model, or "
                         "free memory")

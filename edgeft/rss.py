"""Peak resident memory of this process and its children, per stage. Stdlib only (the device side uses it).

Linux counts a process's peak RSS in /proc/self/status (VmHWM), which starts afresh at exec and, written
"5" to /proc/self/clear_refs, at any point: so each stage of one `edgeft run` process gets its own peak,
not the largest of the stages before it. Children (llama.cpp's quantizer, the bench's one process per
variant) are counted apart: the kernel keeps only the largest child ever waited for, so a stage's
children peak is known only when it set a new largest.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")
_KIB_PER_UNIT = 1 / 1024 if sys.platform == "darwin" else 1  # ru_maxrss: bytes on macOS, KiB on Linux


def peak_mb() -> float:
    """This process's peak RSS since exec or the last reset_peak(), MiB."""
    if _STATUS.is_file():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _KIB_PER_UNIT / 1024, 1)


def reset_peak() -> bool:
    """Restart the peak count at the current RSS; False where the OS cannot (the peak is then since exec)."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def children_peak_mb() -> float:
    """The largest peak RSS of any child process waited for so far, MiB (0 when none)."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * _KIB_PER_UNIT / 1024, 1)


class Stage:
    """One stage's peak memory: this process's own (its count restarted here where the OS can) and, when a
    child it waited for set a new largest peak, the children's."""

    def __init__(self) -> None:
        self._children0 = children_peak_mb()
        self._own = reset_peak()

    def metrics(self) -> dict:
        """peak_rss_mb, its scope ('stage', or 'process' where the count could not restart), children's peak."""
        out = {"peak_rss_mb": peak_mb(), "peak_rss_scope": "stage" if self._own else "process"}
        if children_peak_mb() > self._children0:
            out["children_peak_rss_mb"] = children_peak_mb()
        return out

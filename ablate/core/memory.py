"""Peak memory of a run: what it needed, to size the device for the next one.

    python -c "from ablate.core.memory import PeakMemory; m = PeakMemory('cpu'); print(m.read())"

``PeakMemory(device)`` starts the measurement (stage 3's ``train``, every evaluation run's ``evaluation_run``,
both once the model is loaded) and ``read()`` gives the block that summary.json and metrics.json record as
``peak_memory``: on a GPU, ``torch.cuda.max_memory_allocated`` (tensors; the peak statistics reset at the start)
and ``max_memory_reserved`` (what the caching allocator held, which is what must fit on the card); always, the
process's peak resident set size in bytes (``getrusage`` ``ru_maxrss``; KiB on Linux, bytes on macOS). On Linux
the RSS peak is reset at the start too (``/proc/self/clear_refs``), so a run inside ``ablate study`` does not
report an earlier stage's peak; where it cannot be reset, ``cpu_peak_rss_since`` says "process start". ``bytes``
is the number to size with: CUDA's max allocated on a GPU, the peak RSS on CPU; ``measure`` says which.

Memory is a measurement, not recomputable from the samples: ablate.results.verified leaves it outside what
it verifies. Under ``accelerate launch`` it is rank 0's process and device.
"""

from __future__ import annotations

import resource
import sys

import torch


def _reset_rss_peak() -> bool:
    """Reset the process's RSS high-water mark to its current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    kib_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib_or_bytes if sys.platform == "darwin" else kib_or_bytes * 1024


class PeakMemory:
    """Peak memory from construction to ``read()``, on ``device`` (``cuda``/``cuda:N`` or ``cpu``)."""

    def __init__(self, device: str | torch.device):
        device = torch.device(device)
        self.cuda = device if device.type == "cuda" and torch.cuda.is_available() else None
        if self.cuda is not None:
            torch.cuda.reset_peak_memory_stats(self.cuda)
        self.rss_since = "run start" if _reset_rss_peak() else "process start"

    def read(self) -> dict:
        rss = peak_rss_bytes()
        allocated = torch.cuda.max_memory_allocated(self.cuda) if self.cuda is not None else None
        return {
            "bytes": rss if allocated is None else allocated,
            "measure": "cpu_peak_rss" if allocated is None else "cuda_max_allocated",
            "cuda_max_allocated_bytes": allocated,
            "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved(self.cuda) if self.cuda is not None else None,
            "cpu_peak_rss_bytes": rss,
            "cpu_peak_rss_since": self.rss_since,
        }

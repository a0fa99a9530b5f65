"""Which samples are already recorded: a bounded index of (device, boot, seq).

Per (device, boot) the seen sequence numbers are kept as sorted, merged intervals: a board that
publishes in order costs one interval per boot whatever the number of samples, and a backlog
replayed out of order a few more until its gaps fill. The index covers the dedupe window (the
recent data files, reloaded at start) and forgets boots untouched for longer.
"""

from __future__ import annotations

import bisect

import numpy as np
import numpy.typing as npt

# Beyond this many disjoint runs in one boot (only a hostile or broken board produces them) the
# oldest runs are forgotten: their samples, if they came again, would be stored again rather than
# dropped, i.e. a possible duplicate but never a loss.
MAX_RUNS = 4096


class SeqSet:
    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []  # inclusive

    def __len__(self) -> int:
        return sum(e - s + 1 for s, e in zip(self.starts, self.ends, strict=True))

    @property
    def runs(self) -> int:
        return len(self.starts)

    def __contains__(self, seq: int) -> bool:
        i = bisect.bisect_right(self.starts, seq) - 1
        return i >= 0 and seq <= self.ends[i]

    def add(self, seq: int) -> bool:
        """Record seq; False when it was already there."""
        ends = self.ends
        if ends and seq == ends[-1] + 1:  # the common case: the next sample in order
            ends[-1] = seq
            return True
        starts = self.starts
        i = bisect.bisect_right(starts, seq) - 1
        if i >= 0 and seq <= ends[i]:
            return False
        joins_left = i >= 0 and ends[i] == seq - 1
        joins_right = i + 1 < len(starts) and starts[i + 1] == seq + 1
        if joins_left and joins_right:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joins_left:
            ends[i] = seq
        elif joins_right:
            starts[i + 1] = seq
        else:
            starts.insert(i + 1, seq)
            ends.insert(i + 1, seq)
            if len(starts) > MAX_RUNS:
                del starts[0], ends[0]
        return True

    def add_run(self, first: int, last: int) -> None:
        """Record every seq in [first, last]."""
        starts, ends = self.starts, self.ends
        # The runs [i, j) overlap or touch [first, last]: merge them all into one.
        i = bisect.bisect_left(ends, first - 1)
        j = bisect.bisect_right(starts, last + 1)
        if i < j:
            first = min(first, starts[i])
            last = max(last, ends[j - 1])
        starts[i:j] = [first]
        ends[i:j] = [last]
        if len(starts) > MAX_RUNS:
            del starts[: len(starts) - MAX_RUNS], ends[: len(ends) - MAX_RUNS]

    def add_sorted_unique(self, seqs: npt.NDArray[np.int64]) -> None:
        """Bulk load, for rebuilding from files: seqs sorted ascending without repeats."""
        if len(seqs) == 0:
            return
        breaks = np.flatnonzero(np.diff(seqs) != 1)
        firsts = seqs[np.concatenate(([0], breaks + 1))].tolist()
        lasts = seqs[np.concatenate((breaks, [len(seqs) - 1]))].tolist()
        for first, last in zip(firsts, lasts, strict=True):
            self.add_run(first, last)


class SampleIndex:
    def __init__(self) -> None:
        self.boots: dict[tuple[bytes, int], SeqSet] = {}
        self.touched: dict[tuple[bytes, int], float] = {}

    def add(self, device: bytes, boot: int, seq: int, now: float) -> bool:
        key = (device, boot)
        seen = self.boots.get(key)
        if seen is None:
            seen = self.boots[key] = SeqSet()
        self.touched[key] = now
        return seen.add(seq)

    def contains(self, device: bytes, boot: int, seq: int) -> bool:
        seen = self.boots.get((device, boot))
        return seen is not None and seq in seen

    def load(
        self,
        devices: npt.NDArray[np.bytes_],
        boots: npt.NDArray[np.int64],
        seqs: npt.NDArray[np.int64],
        touched: float,
    ) -> None:
        """Add the identities of rows already in a data file."""
        if len(seqs) == 0:
            return
        order = np.lexsort((seqs, boots, devices))
        devices, boots, seqs = devices[order], boots[order], seqs[order]
        key_change = np.flatnonzero((devices[1:] != devices[:-1]) | (boots[1:] != boots[:-1])) + 1
        bounds = np.concatenate(([0], key_change, [len(seqs)]))
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            key = (bytes(devices[lo]), int(boots[lo]))
            seen = self.boots.get(key)
            if seen is None:
                seen = self.boots[key] = SeqSet()
            seen.add_sorted_unique(np.unique(seqs[lo:hi]))
            self.touched[key] = max(self.touched.get(key, touched), touched)

    def forget_before(self, cutoff: float) -> int:
        """Drop boots untouched since cutoff; how many were dropped."""
        stale = [key for key, when in self.touched.items() if when < cutoff]
        for key in stale:
            del self.boots[key]
            del self.touched[key]
        return len(stale)

    def __len__(self) -> int:
        return len(self.boots)

"""Deterministic dataset mixtures: how many rows of global batch k each dataset gets.

With normalised weights w_d and global batch B, F_d(k), the rows dataset d holds in the first k
batches, is the largest-remainder (Hamilton) apportionment of k*B rows by w_d, in exact integer
arithmetic. So |F_d(k) - w_d*k*B| < 1 at every k, and any run of consecutive batches holds each
dataset's share to within 2 rows. Batch k gives dataset d the q_d = F_d(k + 1) - F_d(k) rows
after those of the datasets before it (config order), and row r of that block is sample
F_d(k) + r of dataset d's own sample index. Everything is a function of k: no state, O(1) to
jump to any step. q_d >= 0 needs w_d * B >= 1 (checked when the mixture is built).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from bignlp_jax.errors import UserError


class MixturePlan:
    def __init__(self, names: list[str], weights: list[float], global_batch: int):
        if not names or len(names) != len(weights):
            raise ValueError("a mixture needs one weight per dataset")
        total = sum(Fraction(w).limit_denominator(10**6) for w in weights)
        fractions = [Fraction(w).limit_denominator(10**6) / total for w in weights]
        self.den = int(np.lcm.reduce([f.denominator for f in fractions]))
        self.num = [int(f * self.den) for f in fractions]
        self.names, self.global_batch = list(names), global_batch
        for name, f in zip(names, fractions):
            if f * global_batch < 1:
                raise UserError(
                    f"data.mixture: dataset {name!r} has weight {float(f):.4g} of "
                    f"train.global_batch_size={global_batch} rows = {float(f * global_batch):.3g}"
                    " rows per batch; every dataset needs at least 1 row per batch\n"
                    "  fix: raise its weight or the global batch size")

    def cumulative(self, k: int) -> list[int]:
        """F_d(k): rows of each dataset in batches 0..k-1."""
        seats = k * self.global_batch
        exact = [n * seats for n in self.num]  # / den
        floors = [x // self.den for x in exact]
        extra = seats - sum(floors)
        by_remainder = sorted(range(len(exact)), key=lambda d: (-(exact[d] % self.den), d))
        for d in by_remainder[:extra]:
            floors[d] += 1
        return floors

    def batch(self, k: int) -> list[tuple[int, int, int]]:
        """[(dataset, first sample, row count)] of batch k, in row order."""
        before, after = self.cumulative(k), self.cumulative(k + 1)
        return [(d, before[d], after[d] - before[d]) for d in range(len(self.names))]

    def rows(self, k: int, lo: int, hi: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """For rows [lo, hi) of batch k: [(dataset, positions in [0, hi-lo), sample numbers)]."""
        out, row = [], 0
        for d, first, count in self.batch(k):
            a, b = max(row, lo), min(row + count, hi)
            if a < b:
                out.append((d, np.arange(a, b) - lo, first + np.arange(a - row, b - row)))
            row += count
        return out

"""Fixed-width integers and combinations ⇄ bytes, for codecs whose payload is a list of choices."""

from __future__ import annotations

from math import comb


class BitWriter:
    def __init__(self):
        self.value, self.length = 0, 0

    def write(self, number: int, bits: int) -> None:
        if not 0 <= number < (1 << bits):
            raise ValueError(f"{number} does not fit in {bits} bits")
        self.value = (self.value << bits) | number
        self.length += bits

    def getvalue(self) -> bytes:
        padding = -self.length % 8  # pad at the end with zeros to whole bytes
        return (self.value << padding).to_bytes((self.length + padding) // 8, "big")


class BitReader:
    def __init__(self, data: bytes, bits: int):
        if len(data) * 8 < bits:
            raise ValueError(f"payload holds {len(data) * 8} bits, needs {bits}")
        self.value = int.from_bytes(data, "big") >> (len(data) * 8 - bits)
        self.remaining = bits

    def read(self, bits: int) -> int:
        self.remaining -= bits
        return (self.value >> self.remaining) & ((1 << bits) - 1)


def combination_bits(n: int, k: int) -> int:
    return max(1, (comb(n, k) - 1).bit_length())


def rank_combination(chosen: list[int]) -> int:
    """The index of a set of distinct integers among all sets of its size (combinatorial number system)."""
    return sum(comb(c, i + 1) for i, c in enumerate(sorted(chosen)))


def unrank_combination(rank: int, n: int, k: int) -> list[int]:
    """The set of k integers in [0, n) with this rank; a rank ≥ C(n, k) (a damaged stream) is a ValueError."""
    if not 0 <= rank < comb(n, k):
        # Checked first: the search below is bounded by n, so such a rank would come out as a repeated entry.
        raise ValueError(f"combination rank {rank} out of range for C({n}, {k})")
    chosen = []
    for i in range(k, 0, -1):
        low, high = i - 1, n - 1  # the largest c with comb(c, i) <= rank, by bisection
        while low < high:
            middle = (low + high + 1) // 2
            if comb(middle, i) <= rank:
                low = middle
            else:
                high = middle - 1
        chosen.append(low)
        rank -= comb(low, i)
    return sorted(chosen)

"""Planning what may be sent: the run's budget cap.

Before each attempt its worst case is reserved (estimated prompt tokens at the input price
plus the output allowance, ``max_tokens``, at the output price); after it, the reservation
is replaced by what the attempt really cost. When spent + reserved + the next worst case
would pass the cap, nothing more is sent and the run stops, resumable with a higher cap.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Budget"]


@dataclass
class Budget:
    """The run's cap in picodollars; ``spent`` starts at what earlier sessions spent."""

    cap_picousd: int
    spent_picousd: int = 0
    reserved_picousd: int = 0
    exhausted: bool = False

    def reserve(self, worst_picousd: int) -> bool:
        """Take ``worst_picousd`` from the budget, or refuse (and mark it exhausted)."""
        if self.spent_picousd + self.reserved_picousd + worst_picousd > self.cap_picousd:
            self.exhausted = True
            return False
        self.reserved_picousd += worst_picousd
        return True

    async def acquire(self, worst_picousd: int) -> bool:
        """:meth:`reserve`, for budgets that may first have to ask the database for more."""
        return self.reserve(worst_picousd)

    def settle(self, reserved_picousd: int, actual_picousd: int) -> None:
        self.reserved_picousd -= reserved_picousd
        self.spent_picousd += actual_picousd

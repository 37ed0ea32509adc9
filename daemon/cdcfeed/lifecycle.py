"""An order's life after its insert, shared by the load (what it writes) and the proof (what
it expects to read): the statuses, what an update moves an order to, and the change mix.

An order is changed at most once: an update moves it from `created` to `updated_status`, a
delete removes it. Which orders a batch changes is the load's business (`load/changes.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

CREATED = "created"
PAID = "paid"
CANCELLED = "cancelled"
STATUSES = (CREATED, PAID, CANCELLED)

OPS = ("insert", "update", "delete")
DEFAULT_MIX = "insert=100"
EXAMPLE_MIX = "insert=70,update=20,delete=10"


def updated_status(order_id: int) -> str:
    """The status an update gives an order: a tenth of them are cancelled, the rest paid."""
    return CANCELLED if order_id % 10 == 0 else PAID


@dataclass(frozen=True, slots=True)
class Mix:
    """The weights of inserts, updates and deletes in every batch."""

    insert: int = 100
    update: int = 0
    delete: int = 0

    @property
    def changes(self) -> bool:
        """Whether batches update or delete: the loading role then needs more privileges."""
        return bool(self.update or self.delete)

    def split(self, size: int) -> tuple[int, int, int]:
        """A batch of `size` changes as (inserts, updates, deletes), the same for every batch.

        Updates and deletes are rounded half up; deletes give way when both round up past
        the batch (size 1, update=1, delete=1), so the three always add up to `size`.
        """
        total = self.insert + self.update + self.delete
        updates = (2 * size * self.update + total) // (2 * total)
        deletes = min((2 * size * self.delete + total) // (2 * total), size - updates)
        return size - updates - deletes, updates, deletes

    def __str__(self) -> str:
        return ",".join(
            f"{op}={weight}"
            for op, weight in zip(OPS, (self.insert, self.update, self.delete), strict=True)
            if weight or op == "insert"
        )


def parse_mix(text: str) -> Mix:
    """`insert=70,update=20,delete=10` (any order; a missing op weighs 0); ValueError naming
    what is wrong."""
    weights: dict[str, int] = {}
    for part in text.replace(" ", "").split(","):
        op, sep, value = part.partition("=")
        if not sep or op not in OPS:
            raise ValueError(
                f"{part!r} is not op=weight with op insert, update or delete, e.g. {EXAMPLE_MIX}"
            )
        if op in weights:
            raise ValueError(f"{op} is given twice, e.g. {EXAMPLE_MIX}")
        if not value.isdigit():
            raise ValueError(f"{op}={value}: a weight is a whole number 0 or above")
        weights[op] = int(value)
    mix = Mix(weights.get("insert", 0), weights.get("update", 0), weights.get("delete", 0))
    if mix.insert <= 0:
        raise ValueError(
            f"insert must weigh more than 0: updates and deletes change orders that inserts "
            f"made, e.g. {EXAMPLE_MIX}"
        )
    return mix

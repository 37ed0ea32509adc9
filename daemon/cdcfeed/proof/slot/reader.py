"""A logical replication slot as a verification source: checked, read in chunks, advanced.

Chunks of about `chunk_changes` messages are peeked from the slot (whole transactions,
streamed so memory stays flat), folded by `StreamReader`, and recorded with the new position
in one transaction of the verifier's state; only then is the slot advanced. Peek, not get:
a connection lost mid-chunk re-reads the chunk instead of losing it.
"""

from __future__ import annotations

from contextlib import aclosing

from loguru import logger

from cdcfeed.database import VerifySession
from cdcfeed.errors import CdcfeedError, ObjectMissing, SlotBusy, UserError
from cdcfeed.lsn import int_to_lsn
from cdcfeed.proof.events import StreamEvent
from cdcfeed.proof.slot.state import VerifyState
from cdcfeed.proof.slot.stream import StreamReader

CHUNK_CHANGES = 50_000


class SlotUnavailable(CdcfeedError):
    """The slot cannot be read now: another reader holds it (or another verify its state),
    or it was dropped. A condition to retry, not a mistake: the daemon's verifier reopens
    later, which recreates a dropped slot when allowed; a one-shot run ends with the line."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class SlotSource:
    """One pgoutput slot, read for verification on the verifier's session."""

    def __init__(
        self,
        db: VerifySession,
        slot: str,
        publication: str,
        chunk_changes: int = CHUNK_CHANGES,
    ) -> None:
        self.db = db
        self.slot = slot
        self.publication = publication
        self.chunk_changes = chunk_changes

    @property
    def hint(self) -> str:
        """How this source passes a batch it never saw, and what to check."""
        orders = ".".join(self.db.orders_relation)
        return (
            f"the slot read past it without its transaction (is {orders} in publication "
            f"{self.publication}?)"
        )

    async def prepare(self, *, create_slot: bool, create_publication: bool) -> int:
        """Takes the slot's verify lock, checks the publication and the slot (creating either
        when asked); returns the slot's confirmed position, where a new proof starts."""
        db = self.db
        if not await db.try_lock(self.slot):
            raise SlotUnavailable(
                "cdc.verify_slot", f"another cdcfeed verify is already reading slot {self.slot}"
            )
        await self._check_publication(create_publication)
        slot = await db.slot(self.slot)
        if slot is None:
            if not create_slot:
                raise UserError(
                    "cdc.verify_slot",
                    f"no replication slot {self.slot!r}; pass --create-slot to give verify a "
                    "slot of its own (never Debezium's: verifying consumes the slot)",
                )
            await db.create_slot(self.slot)  # another verify may have created it meanwhile
            slot = await db.slot(self.slot)
            assert slot is not None
        if slot["slot_type"] != "logical" or slot["plugin"] != "pgoutput":
            raise UserError(
                "cdc.verify_slot",
                f"slot {self.slot!r} is a {slot['slot_type']} slot with plugin "
                f"{slot['plugin']!r}; verify reads logical slots with plugin pgoutput",
            )
        if slot["database"] != slot["here"]:
            raise UserError(
                "cdc.verify_slot",
                f"slot {self.slot!r} belongs to database {slot['database']!r}, "
                f"not {slot['here']!r}; point --dsn at that database",
            )
        confirmed: int = slot["confirmed_flush_lsn"]
        return confirmed

    async def _check_publication(self, create: bool) -> None:
        record = await self.db.publication(self.publication)
        if record is None:
            if not create:
                raise UserError(
                    "cdc.publication",
                    f"no publication {self.publication!r}; create it (before the slot) with "
                    f"`cdcfeed init-db --publication {self.publication}`",
                )
            await self.db.ensure_publication(self.publication)
            return
        orders = ".".join(self.db.orders_relation)
        if not record[0] and orders not in record[1]:
            logger.warning(
                f"publication {self.publication} does not cover {orders}: no batch can reach "
                "the stream, so every COMPLETED batch will be reported missing"
            )
        ledger = ".".join(self.db.ledger_relation)
        if not record[0] and ledger not in record[1]:
            logger.warning(
                f"publication {self.publication} does not cover {ledger}: the updates and "
                "deletes of a change mix cannot be told from their batches' claims, so each "
                "will be reported as a change no batch made"
            )

    async def confirmed(self) -> int:
        """The slot's confirmed_flush_lsn: how far it has been consumed, by us or others."""
        slot = await self.db.slot(self.slot)
        if slot is None:
            raise SlotUnavailable(
                "cdc.verify_slot", f"replication slot {self.slot!r} was dropped while verifying"
            )
        confirmed: int = slot["confirmed_flush_lsn"]
        return confirmed

    def skipped_reason(self, position: int, confirmed: int) -> str:
        return (
            f"the slot moved from {int_to_lsn(position)} to {int_to_lsn(confirmed)} without "
            "verify: another reader consumed those changes, so their batches cannot be proven"
        )

    async def flushed(self) -> int:
        """Where the WAL is flushed: what the slot can give now."""
        return await self.db.flush_lsn()

    async def read_chunk(
        self, state: VerifyState, position: int, upto: int
    ) -> tuple[int, bool, list[StreamEvent]]:
        """Reads one chunk from `position`, records it in `state`; (new position, whether the
        chunk was full, the changes cdcfeed never makes that it carried)."""
        reader = StreamReader(self.db.orders_relation, position, self.db.ledger_relation)
        db = self.db
        try:
            async with (
                db.transaction(),
                aclosing(db.changes(self.slot, upto, self.chunk_changes, self.publication)) as data,
            ):
                async for message in data:
                    reader.feed(message)
                reader.finish()
                full = reader.messages >= self.chunk_changes
                # Not full: every transaction committing before `upto` was read.
                new_position = max(position, reader.last_end if full else upto, reader.last_end)
                await state.record(
                    reader.observations,
                    reader.events,
                    new_position,
                    self.publication,
                    reader.changes,
                )
        except SlotBusy as exc:
            raise SlotUnavailable(
                "cdc.verify_slot", f"slot {self.slot} is in use ({exc})"
            ) from None
        except ObjectMissing as exc:
            await self.confirmed()  # a dropped slot says so
            raise UserError(
                "cdc.publication",
                f"the slot cannot decode with publication {self.publication!r} "
                f"({exc}); the publication must exist before the slot's "
                "position: create it, then a new slot (--create-slot with a new --slot)",
            ) from None
        return new_position, full, reader.events

    async def advance(self, position: int) -> None:
        """Lets the server free the WAL before `position`, once it is recorded."""
        if position > await self.confirmed():
            try:
                await self.db.advance_slot(self.slot, position)
            except SlotBusy as exc:
                raise self._in_use(exc) from None

    def _in_use(self, exc: SlotBusy) -> SlotUnavailable:
        return SlotUnavailable("cdc.verify_slot", f"slot {self.slot} is in use ({exc})")

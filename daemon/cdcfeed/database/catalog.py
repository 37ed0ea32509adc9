"""Every SQL statement of the load, by name; the CDC side's are in `cdc_catalog.py`.

Identifiers are quoted in `names.py`; values are always parameters. Statements are rendered
once per `Names` and kept (`statements`).
"""

from __future__ import annotations

import math
from functools import lru_cache

from cdcfeed.database.cdc_catalog import CdcStatements
from cdcfeed.database.names import (
    INSTANCES_TABLE,
    ORDER_IDS_TABLE,
    STAGING_TABLE,
    Names,
    quote_ident,
    quote_literal,
)

# The embedded server's bootstrap (run before any cdcfeed schema exists).
DATABASE_EXISTS = "SELECT 1 FROM pg_database WHERE datname = $1"

# Start-up checks (privileges.py), run before any DDL and before the first batch. Catalog
# reads need no privileges: which of the schema's relations exist, and which privileges the
# role lacks (the names are rendered by `privileges.py`: schemas raw, relations quoted).
EXISTING_RELATIONS = """
    SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = $1 AND c.relname = ANY($2::text[])
"""
# Of the columns later versions added ($2 tables, $3 columns), those an existing table lacks.
MISSING_COLUMNS = """
    SELECT t.rel || '.' || t.col FROM unnest($2::text[], $3::text[]) AS t(rel, col)
    JOIN pg_class c ON c.relname = t.rel
    JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = $1
    WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attname = t.col AND NOT a.attisdropped)
"""
CURRENT_DATABASE = "SELECT current_database()::text"
# Of the role $4 (NULL: the connection's own).
LACKING_PRIVILEGES = """
    SELECT i::int FROM unnest($1::text[], $2::text[], $3::text[])
        WITH ORDINALITY AS t(kind, name, privilege, i),
        LATERAL (SELECT coalesce($4::name, current_user) AS role) r
    WHERE NOT CASE kind
        WHEN 'SCHEMA' THEN has_schema_privilege(r.role, name, privilege)
        WHEN 'SEQUENCE' THEN has_sequence_privilege(r.role, name, privilege)
        WHEN 'DATABASE' THEN has_database_privilege(r.role, name, privilege)
        ELSE has_table_privilege(r.role, name, privilege)
    END
    ORDER BY i
"""
CURRENT_ROLE = "SELECT current_user::text"
# What logical decoding needs of the server, and what of it is taken (server_settings.py).
SERVER_SETTINGS = """
    SELECT current_setting('wal_level'),
           current_setting('max_replication_slots')::int,
           current_setting('max_wal_senders')::int,
           (SELECT count(*) FROM pg_replication_slots)::int,
           (SELECT count(*) FROM pg_stat_replication)::int
"""


def create_database(name: str) -> str:
    return f"CREATE DATABASE {quote_ident(name)}"


@lru_cache(maxsize=16)
def statements(names: Names) -> Statements:
    """The statements for `names`, rendered on first use."""
    return Statements(names)


class Statements:
    """The load's statements (and, as `cdc`, the CDC side's), rendered for one `Names`."""

    def __init__(self, names: Names) -> None:
        self.names = names
        self.cdc = CdcStatements(names)
        schema = quote_ident(names.schema)
        orders = names.table(names.orders)
        batches = names.table(names.batches)
        order_ids = names.table(ORDER_IDS_TABLE)
        instances = names.table(INSTANCES_TABLE)
        sequence = names.regclass_batch_sequence
        in_progress_index = names.batches_index("in_progress")

        self.schema_ddl = f"""
            CREATE SCHEMA IF NOT EXISTS {schema};
            CREATE SEQUENCE IF NOT EXISTS {sequence};
            CREATE TABLE IF NOT EXISTS {orders} (
                order_id    bigint        PRIMARY KEY,
                batch_id    bigint        NOT NULL,
                customer_id integer       NOT NULL,
                amount      numeric(10,2) NOT NULL,
                created_at  timestamptz   NOT NULL
            );
            CREATE TABLE IF NOT EXISTS {batches} (
                batch_id         bigint      PRIMARY KEY,
                instance         text        NOT NULL,
                status           text        NOT NULL
                    CHECK (status IN ('IN_PROGRESS', 'COMPLETED', 'FAILED')),
                row_count        integer     NOT NULL,
                first_order_id   bigint      NOT NULL,
                start_lsn        pg_lsn,
                end_lsn          pg_lsn,
                xid              xid8,
                feed_file        text,
                started_at       timestamptz NOT NULL DEFAULT now(),
                completed_at     timestamptz,
                error            text,
                recovered        boolean     NOT NULL DEFAULT false,
                generate_seconds double precision,
                write_seconds    double precision,
                copy_seconds     double precision
            );
            CREATE INDEX IF NOT EXISTS {in_progress_index}
                ON {batches} (instance) WHERE status = 'IN_PROGRESS';
            -- Order ids are handed out in blocks, one per batch, from this row: a sequence
            -- cannot advance by n atomically, an UPDATE of one row can.
            CREATE TABLE IF NOT EXISTS {order_ids} (
                orders_table  text   PRIMARY KEY,
                next_order_id bigint NOT NULL
            );
            CREATE TABLE IF NOT EXISTS {instances} (
                instance     text        PRIMARY KEY,
                started_at   timestamptz NOT NULL DEFAULT now(),
                heartbeat_at timestamptz NOT NULL DEFAULT now(),
                lease_until  timestamptz NOT NULL DEFAULT now()
            );
            -- The change mix's columns, added the same way to new tables and to those of
            -- older versions (hence not in the CREATEs above).
            ALTER TABLE {orders}
                ADD COLUMN IF NOT EXISTS status     text NOT NULL DEFAULT 'created',
                ADD COLUMN IF NOT EXISTS updated_at timestamptz,
                ADD COLUMN IF NOT EXISTS note       text;
            -- Out of line and uncompressed: a note is TOASTed as itself, whatever it holds.
            ALTER TABLE {orders} ALTER COLUMN note SET STORAGE EXTERNAL;
            -- What a batch changed besides its inserts, written by its own transaction.
            ALTER TABLE {batches}
                ADD COLUMN IF NOT EXISTS updated     integer NOT NULL DEFAULT 0,
                ADD COLUMN IF NOT EXISTS deleted     integer NOT NULL DEFAULT 0,
                ADD COLUMN IF NOT EXISTS updated_ids bigint[],
                ADD COLUMN IF NOT EXISTS deleted_ids bigint[];
            -- The change cursor: the lowest order id no batch has been given to change yet.
            ALTER TABLE {order_ids} ADD COLUMN IF NOT EXISTS next_change_id bigint;
        """
        self.lock_schema = "SELECT pg_advisory_xact_lock($1)"
        self.seed_order_ids = f"""
            INSERT INTO {order_ids} (orders_table, next_order_id)
            VALUES ($1, coalesce((SELECT max(order_id) + 1 FROM {orders}), 1))
            ON CONFLICT (orders_table) DO NOTHING
        """
        self.seed_change_cursor = f"""
            UPDATE {order_ids}
            SET next_change_id = coalesce((SELECT min(order_id) FROM {orders}), next_order_id)
            WHERE orders_table = $1 AND next_change_id IS NULL
        """
        # Step 1 of the protocol, for several batches at once (ids.py): $4 batch ids and one
        # block of $4 * $2 order ids, in one round trip and one commit. A NULL block: no
        # allocation row (the schema was never initialised).
        self.reserve_ids = f"""
            WITH block AS (
                UPDATE {order_ids} SET next_order_id = next_order_id + $2::bigint * $4::integer
                WHERE orders_table = $1
                RETURNING next_order_id - $2::bigint * $4::integer AS first_order_id
            )
            SELECT (SELECT first_order_id FROM block),
                   ARRAY(SELECT nextval($3::regclass) FROM generate_series(1, $4))
        """
        # The same for batches that update or delete: each also gets a window of $5 order ids
        # to change, from the change cursor, never past the inserts made before this
        # reservation. The row is locked first so that both cursors are read as updated.
        self.reserve_ids_and_changes = f"""
            WITH cursors AS (
                SELECT next_order_id, next_change_id FROM {order_ids}
                WHERE orders_table = $1
                FOR UPDATE
            ), block AS (
                UPDATE {order_ids} o
                SET next_order_id = c.next_order_id + $2::bigint * $4::integer,
                    next_change_id = LEAST(c.next_change_id + $5::bigint * $4::integer,
                                           c.next_order_id)
                FROM cursors c
                WHERE o.orders_table = $1
                RETURNING c.next_order_id AS first_order_id, c.next_change_id AS first_change_id
            )
            SELECT (SELECT first_order_id FROM block),
                   ARRAY(SELECT nextval($3::regclass) FROM generate_series(1, $4)),
                   (SELECT first_change_id FROM block)
        """
        self.sequence_regclass = sequence
        # Step 3: start_lsn is read in the same statement that opens the batch. A batch sends
        # it with the claim, its values rendered (`open_and_claim`); this parameterised form
        # records a batch that failed before its COPY (`Ledger.record_unstarted_failure`).
        self._open_head = f"""
            INSERT INTO {batches} (batch_id, instance, status, row_count, first_order_id,
                                   start_lsn, feed_file, generate_seconds, write_seconds)
            VALUES """
        self.open_batch = (
            f"{self._open_head}($1, $2, 'IN_PROGRESS', $3, $4, pg_current_wal_insert_lsn(), "
            "$5, $6, $7) RETURNING start_lsn::text"
        )
        # The claim, around its batch id (see `claim_batch`).
        self._claim_head = (
            f"BEGIN; UPDATE {batches} SET xid = pg_current_xact_id() WHERE batch_id = "
        )
        self._claim_tail = " AND status = 'IN_PROGRESS'"
        # A batch that updates or deletes: its feed file is COPied into this staging table
        # (made on first use by each connection, inside the claim's round trip), then one
        # statement applies it and records what it changed in the batch's row.
        self.staging_table = STAGING_TABLE
        self._claim_staged_head = (
            f"BEGIN; CREATE TEMPORARY TABLE IF NOT EXISTS {quote_ident(STAGING_TABLE)} ("
            "order_id bigint, batch_id bigint, customer_id integer, amount numeric(10,2), "
            "created_at timestamptz, note text, op text, status text, updated_at timestamptz"
            f") ON COMMIT DELETE ROWS; {self._claim_head}"
        )
        staging = f"pg_temp.{quote_ident(STAGING_TABLE)}"
        self.apply_changes = f"""
            WITH inserted AS (
                INSERT INTO {orders} (order_id, batch_id, customer_id, amount, created_at, note)
                SELECT order_id, batch_id, customer_id, amount, created_at, note
                FROM {staging} WHERE op = 'c'
                RETURNING 1
            ), updated AS (
                UPDATE {orders} o SET status = s.status, updated_at = s.updated_at
                FROM {staging} s
                WHERE s.op = 'u' AND o.order_id = s.order_id
                RETURNING o.order_id
            ), deleted AS (
                DELETE FROM {orders} o USING {staging} s
                WHERE s.op = 'd' AND o.order_id = s.order_id
                RETURNING o.order_id
            )
            UPDATE {batches}
            SET updated = (SELECT count(*) FROM updated),
                deleted = (SELECT count(*) FROM deleted),
                updated_ids = ARRAY(SELECT order_id FROM updated ORDER BY 1),
                deleted_ids = ARRAY(SELECT order_id FROM deleted ORDER BY 1)
            WHERE batch_id = $1
            RETURNING (SELECT count(*) FROM inserted)::int, updated, deleted
        """
        self.commit = "COMMIT"
        self.rollback = "ROLLBACK"
        # Step 5: a new statement after the COPY committed, so the insert position is past
        # the commit record. pg_current_wal_lsn() would be the write position, which can trail.
        self.complete_batch = f"""
            UPDATE {batches}
            SET status = 'COMPLETED', end_lsn = pg_current_wal_insert_lsn(),
                row_count = $2, completed_at = now(), copy_seconds = $3
            WHERE batch_id = $1 AND status = 'IN_PROGRESS'
            RETURNING start_lsn::text, end_lsn::text, xid::text
        """
        self.fail_batch = f"""
            UPDATE {batches}
            SET status = 'FAILED', error = $2, completed_at = now(), copy_seconds = $3
            WHERE batch_id = $1 AND status = 'IN_PROGRESS'
        """
        # Settling one batch whose COPY outcome is unknown (Ledger.settle): its row, locked.
        # NOWAIT: a lock held means its COPY transaction (or another settler) is still at it.
        self.lock_batch = f"""
            SELECT status, first_order_id, row_count, xid::text, end_lsn::text, updated, deleted
            FROM {batches}
            WHERE batch_id = $1
            FOR UPDATE NOWAIT
        """
        self.count_block = f"""
            SELECT count(*) FROM {orders}
            WHERE order_id >= $1 AND order_id < $1 + $2 AND batch_id = $3
        """
        self.recover_batch = f"""
            UPDATE {batches}
            SET status = 'COMPLETED', end_lsn = pg_current_wal_insert_lsn(),
                xid = coalesce(xid, $3::text::xid8), row_count = $2, completed_at = now(),
                recovered = true
            WHERE batch_id = $1 AND status = 'IN_PROGRESS'
            RETURNING end_lsn::text
        """
        self.recent_batches = f"""
            SELECT batch_id, instance, status, row_count, start_lsn::text, end_lsn::text,
                   xid::text, started_at, completed_at, recovered, error,
                   generate_seconds, write_seconds, copy_seconds, updated, deleted
            FROM {batches} ORDER BY batch_id DESC LIMIT $1
        """
        # Leases (leases.py): each instance renews its row every heartbeat; the batches of
        # an instance whose lease lapsed are settled by the others.
        self.register_instance = f"""
            WITH previous AS (
                SELECT lease_until > now() AS live FROM {instances} WHERE instance = $1
            )
            INSERT INTO {instances} (instance, started_at, heartbeat_at, lease_until)
            VALUES ($1, clock_timestamp(), now(), now() + make_interval(secs => $2))
            ON CONFLICT (instance) DO UPDATE
            SET started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,
                lease_until = excluded.lease_until
            RETURNING started_at, coalesce((SELECT live FROM previous), false)
        """
        self.renew_lease = f"""
            INSERT INTO {instances} (instance, started_at, heartbeat_at, lease_until)
            VALUES ($1, $3, now(), now() + make_interval(secs => $2))
            ON CONFLICT (instance) DO UPDATE
            SET heartbeat_at = excluded.heartbeat_at, lease_until = excluded.lease_until
            RETURNING started_at
        """
        self.release_lease = f"""
            UPDATE {instances} SET lease_until = now() WHERE instance = $1 AND started_at = $2
        """
        # IN_PROGRESS batches nobody is working on: an earlier run's of this instance, or any
        # of an instance whose lease lapsed (or that never had one). SKIP LOCKED passes over
        # batches whose COPY is running (see claim_batch) and those another settler holds.
        self.claim_abandoned = f"""
            SELECT b.batch_id, b.first_order_id, b.row_count, b.xid::text, b.instance,
                   b.updated, b.deleted
            FROM {batches} b
            WHERE b.status = 'IN_PROGRESS'
              AND CASE WHEN b.instance = $1 THEN b.started_at < $2
                       ELSE NOT EXISTS (SELECT 1 FROM {instances} i
                                        WHERE i.instance = b.instance AND i.lease_until > now())
                  END
            ORDER BY b.batch_id
            LIMIT $3
            FOR UPDATE OF b SKIP LOCKED
        """
        # At start, an earlier run's batches are waited for instead of skipped: a run killed
        # mid-COPY leaves a backend that holds the lock until it has read the rest of the data.
        self.claim_earlier_runs = f"""
            SELECT batch_id, first_order_id, row_count, xid::text, instance, updated, deleted
            FROM {batches}
            WHERE status = 'IN_PROGRESS' AND instance = $1 AND started_at < $2
            ORDER BY batch_id
            LIMIT $3
            FOR UPDATE
        """
        # The xid of the transaction that loaded a block, from a row's xmin (32 bits) widened
        # to xid8 against the current snapshot's xmax: a recovered batch keeps a checkable xid.
        # Only a row still 'created' has the loader's xmin: an updated one has the updater's.
        # No such row: NULL.
        self.block_xid = f"""
            WITH s AS (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax),
                 o AS (SELECT xmin::text::bigint AS xid32 FROM {orders}
                       WHERE order_id >= $1 AND order_id < $1 + $2 AND batch_id = $3
                         AND status = 'created'
                       LIMIT 1),
                 w AS (SELECT (s.xmax >> 32 << 32) | o.xid32 AS xid, s.xmax FROM s, o)
            SELECT (CASE WHEN xid >= xmax THEN xid - 4294967296 ELSE xid END)::text FROM w
        """
        self.ping = "SELECT 1"

    def claim_batch(self, batch_id: int) -> str:
        """Step 4 opens with this: BEGIN and the claim, in one simple-query round trip.

        The UPDATE records the transaction's own xid in the batch row, so the row says
        whether the COPY committed (the xid is in it) or not (no xid), and it keeps the row
        locked until commit or rollback: a settler (FOR UPDATE SKIP LOCKED / NOWAIT) never
        decides a batch whose COPY is running. "UPDATE 0" means a settler decided it first:
        do not COPY. The id is an int, rendered by us: a simple query takes no parameters.
        """
        return f"{self._claim_head}{int(batch_id)}{self._claim_tail}"

    def open_and_claim(
        self,
        batch_id: int,
        instance: str,
        rows: int,
        first_order_id: int,
        feed_file: str,
        generate_seconds: float,
        write_seconds: float,
        *,
        staged: bool,
    ) -> str:
        """Steps 3 and the start of 4 in one simple-query round trip: the IN_PROGRESS row,
        committed by its own COMMIT (the statements before it form a transaction of their
        own), then BEGIN and the claim, whose transaction stays open for the COPY.

        A round trip less for every batch, at the price of values rendered into the text (a
        simple query takes no parameters): integers by us, floats from our clock, strings
        through `quote_literal`. Its status is the claim's ("UPDATE 1").
        """
        values = ", ".join(
            (
                str(int(batch_id)),
                quote_literal(instance),
                "'IN_PROGRESS'",
                str(int(rows)),
                str(int(first_order_id)),
                "pg_current_wal_insert_lsn()",
                quote_literal(feed_file),
                _seconds(generate_seconds),
                _seconds(write_seconds),
            )
        )
        claim = self.claim_staged_batch(batch_id) if staged else self.claim_batch(batch_id)
        return f"{self._open_head}({values}); COMMIT; {claim}"

    def claim_staged_batch(self, batch_id: int) -> str:
        """`claim_batch` for a batch that updates or deletes: the staging table first."""
        return f"{self._claim_staged_head}{int(batch_id)}{self._claim_tail}"

    def replica_identity(self, identity: str) -> str:
        """`ALTER TABLE orders REPLICA IDENTITY DEFAULT|FULL` (only those two)."""
        keyword = {"default": "DEFAULT", "full": "FULL"}[identity]
        return f"ALTER TABLE {self.names.table(self.names.orders)} REPLICA IDENTITY {keyword}"


def _seconds(value: float) -> str:
    """A duration as an SQL literal (NULL if it is not a finite number)."""
    number = float(value)
    return repr(number) if math.isfinite(number) else "NULL"

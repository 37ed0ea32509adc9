"""Every SQL statement cdcfeed runs, by name.

Identifiers come from configuration, so they are always quoted with `quote_ident`; values
are always parameters. Statements are rendered once per `Names` and kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ORDER_COLUMNS = ("order_id", "batch_id", "customer_id", "amount", "created_at")

# Serialises concurrent `init-db` runs: CREATE ... IF NOT EXISTS alone races on the catalog.
SCHEMA_LOCK_KEY = 0x63646366  # "cdcf"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Names:
    schema: str
    orders: str
    batches: str
    # Rendered statements, derived from the names above.
    q: Statements = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "q", Statements(self))

    @property
    def batch_sequence(self) -> str:
        return f"{self.batches}_batch_id_seq"

    @property
    def regclass_batch_sequence(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.batch_sequence)}"


class Statements:
    def __init__(self, names: Names) -> None:
        schema = quote_ident(names.schema)
        orders = f"{schema}.{quote_ident(names.orders)}"
        batches = f"{schema}.{quote_ident(names.batches)}"
        order_ids = f"{schema}.{quote_ident('cdcfeed_order_ids')}"
        instances = f"{schema}.{quote_ident('cdcfeed_instances')}"
        sequence = names.regclass_batch_sequence
        in_progress_index = quote_ident(f"{names.batches}_in_progress_idx")

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
        """
        self.lock_schema = "SELECT pg_advisory_xact_lock($1)"
        self.seed_order_ids = f"""
            INSERT INTO {order_ids} (orders_table, next_order_id)
            VALUES ($1, coalesce((SELECT max(order_id) + 1 FROM {orders}), 1))
            ON CONFLICT (orders_table) DO NOTHING
        """
        # Step 1 of the protocol: a batch id and a block of order ids in one round trip.
        self.allocate = f"""
            WITH batch AS (SELECT nextval($3::regclass) AS batch_id)
            UPDATE {order_ids} SET next_order_id = next_order_id + $2
            WHERE orders_table = $1
            RETURNING (SELECT batch_id FROM batch), next_order_id - $2 AS first_order_id
        """
        self.sequence_regclass = sequence
        # Step 3: start_lsn is read in the same statement that opens the batch.
        self.open_batch = f"""
            INSERT INTO {batches} (batch_id, instance, status, row_count, first_order_id,
                                   start_lsn, feed_file, generate_seconds, write_seconds)
            VALUES ($1, $2, 'IN_PROGRESS', $3, $4, pg_current_wal_insert_lsn(), $5, $6, $7)
            RETURNING start_lsn::text
        """
        self.current_xid = "SELECT pg_current_xact_id()::text"
        # Step 4 opens with this: the batch row stays locked until the COPY commits or rolls
        # back, so a settler (FOR UPDATE SKIP LOCKED, reconcile.py) never decides a batch whose
        # COPY is still running; no row back means a settler decided it first: do not COPY.
        self.claim_batch = f"""
            SELECT pg_current_xact_id()::text FROM {batches}
            WHERE batch_id = $1 AND status = 'IN_PROGRESS'
            FOR UPDATE
        """
        # Step 5: a new statement after the COPY committed, so the insert position is past
        # the commit record. pg_current_wal_lsn() would be the write position, which can trail.
        self.complete_batch = f"""
            UPDATE {batches}
            SET status = 'COMPLETED', end_lsn = pg_current_wal_insert_lsn(), xid = $2::text::xid8,
                row_count = $3, completed_at = now(), copy_seconds = $4
            WHERE batch_id = $1 AND status = 'IN_PROGRESS'
            RETURNING end_lsn::text
        """
        self.fail_batch = f"""
            UPDATE {batches}
            SET status = 'FAILED', error = $2, completed_at = now(), copy_seconds = $3
            WHERE batch_id = $1 AND status = 'IN_PROGRESS'
        """
        # Settling a batch whose COPY outcome is unknown: the transaction status when its
        # xid is known, otherwise the rows themselves (a COPY commits all or nothing).
        self.xact_status = "SELECT pg_xact_status($1::text::xid8)"
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
                   generate_seconds, write_seconds, copy_seconds
            FROM {batches} ORDER BY batch_id DESC LIMIT $1
        """
        # Leases (reconcile.py): each instance renews its row every heartbeat; the batches of
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
            SELECT b.batch_id, b.first_order_id, b.row_count, b.xid::text, b.instance
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
            SELECT batch_id, first_order_id, row_count, xid::text, instance
            FROM {batches}
            WHERE status = 'IN_PROGRESS' AND instance = $1 AND started_at < $2
            ORDER BY batch_id
            LIMIT $3
            FOR UPDATE
        """
        # The xid of the transaction that loaded a block, from a row's xmin (32 bits) widened
        # to xid8 against the current snapshot's xmax: a recovered batch keeps a checkable xid.
        self.block_xid = f"""
            WITH s AS (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax),
                 o AS (SELECT xmin::text::bigint AS xid32 FROM {orders}
                       WHERE order_id >= $1 AND order_id < $1 + $2 AND batch_id = $3 LIMIT 1),
                 w AS (SELECT (s.xmax >> 32 << 32) | o.xid32 AS xid, s.xmax FROM s, o)
            SELECT (CASE WHEN xid >= xmax THEN xid - 4294967296 ELSE xid END)::text FROM w
        """
        self.ping = "SELECT 1"

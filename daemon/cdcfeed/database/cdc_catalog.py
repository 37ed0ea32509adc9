"""The SQL of the CDC side: replication slots, publications, and verify's own state.

Kept apart from `catalog.py` (the load's statements) so each side can change without the
other. Identifiers are quoted in `names.py`; values are always parameters. LSNs travel as
integers: asyncpg's pg_lsn codec maps them both ways.
"""

from __future__ import annotations

from cdcfeed.database.names import (
    PENDING_CHANGES_TABLE,
    PENDING_TABLE,
    PROGRESS_TABLE,
    RESULTS_TABLE,
    Names,
    quote_ident,
)

# safe_wal_size arrived in PostgreSQL 13; older servers report nothing for it.
SAFE_WAL_SIZE_SINCE = 13

# What a batch of the change mix did, from its ledger row `b`. Through to_jsonb, so a ledger
# older than the change mix (never upgraded by a load of this version) reads as insert-only
# instead of failing the query.
_CHANGE_COLUMNS = """
    (to_jsonb(b) ->> 'updated')::bigint AS updated,
    (to_jsonb(b) ->> 'deleted')::bigint AS deleted,
    nullif(to_jsonb(b) -> 'updated_ids', 'null')::text AS updated_ids,
    nullif(to_jsonb(b) -> 'deleted_ids', 'null')::text AS deleted_ids
"""


class CdcStatements:
    def __init__(self, names: Names) -> None:
        batches = names.table(names.batches)
        progress = names.table(PROGRESS_TABLE)
        pending = names.table(PENDING_TABLE)
        pending_changes = names.table(PENDING_CHANGES_TABLE)
        results = names.table(RESULTS_TABLE)
        end_lsn_index = names.batches_index("end_lsn")
        start_lsn_index = names.batches_index("start_lsn")
        self.orders_relation = names.orders_relation
        self.qualified_orders = names.table(names.orders)
        self.qualified_batches = batches
        self.qualified_results = results

        # Run by `schema.init_schema` under the schema lock, after the load's own DDL.
        self.ledger_indexes_ddl = f"""
            -- Slot metrics count and time batches by end_lsn every poll, and verify walks
            -- batches by start_lsn; the ledger grows for weeks, so both are index ranges.
            CREATE INDEX IF NOT EXISTS {end_lsn_index}
                ON {batches} (end_lsn) WHERE status = 'COMPLETED';
            CREATE INDEX IF NOT EXISTS {start_lsn_index} ON {batches} (start_lsn);
        """
        # verify's own state, created when verify first runs (a database that is never
        # verified carries none of it); the indexes too, for ledgers older than them.
        verify_tables = f"""
            -- One row per verified slot. Every transaction that commits before `position`
            -- has been read from the slot and recorded; `checked` is the position the last
            -- verdicts were given at; `waiting` the batches IN_PROGRESS then.
            CREATE TABLE IF NOT EXISTS {progress} (
                slot        text        PRIMARY KEY,
                publication text        NOT NULL,
                scope_lsn   pg_lsn      NOT NULL,
                position    pg_lsn      NOT NULL,
                checked     pg_lsn      NOT NULL,
                waiting     bigint[]    NOT NULL DEFAULT '{{}}',
                updated_at  timestamptz NOT NULL DEFAULT now()
            );
            -- What the stream carried for batches not judged yet: reading a slot is
            -- destructive, so the summary waits here until the ledger settles the batch.
            CREATE TABLE IF NOT EXISTS {pending} (
                slot           text    NOT NULL,
                batch_id       bigint  NOT NULL,
                commit_lsn     pg_lsn  NOT NULL,
                commit_end_lsn pg_lsn  NOT NULL,
                xid            bigint  NOT NULL,
                rows           bigint  NOT NULL,
                min_order_id   bigint  NOT NULL,
                max_order_id   bigint  NOT NULL,
                sum_order_id   numeric NOT NULL,
                PRIMARY KEY (slot, batch_id, commit_lsn)
            );
            -- Verdicts: one 'batch' row per judged batch, and 'stream' rows for changes
            -- cdcfeed never makes (UPDATE, DELETE, TRUNCATE of orders; a slot read by others).
            CREATE TABLE IF NOT EXISTS {results} (
                id          bigserial   PRIMARY KEY,
                slot        text        NOT NULL,
                kind        text        NOT NULL CHECK (kind IN ('batch', 'stream')),
                batch_id    bigint,
                status      text,
                result      text        NOT NULL CHECK (result IN ('ok', 'violation')),
                rows        bigint      NOT NULL DEFAULT 0,
                xid         bigint,
                commit_lsn  pg_lsn,
                reason      text,
                verified_at timestamptz NOT NULL DEFAULT now()
            );
            -- The change mix: what each verdict found the batch updated and deleted, and the
            -- after images that lacked a TOASTed value (resolved: the before image held it).
            ALTER TABLE {results}
                ADD COLUMN IF NOT EXISTS updated         bigint NOT NULL DEFAULT 0,
                ADD COLUMN IF NOT EXISTS deleted         bigint NOT NULL DEFAULT 0,
                ADD COLUMN IF NOT EXISTS unchanged_toast bigint NOT NULL DEFAULT 0,
                ADD COLUMN IF NOT EXISTS resolved_toast  bigint NOT NULL DEFAULT 0;
            -- What a transaction updated and deleted for a batch not judged yet (the batch
            -- whose ledger row it claimed), as `ChangeObservation` in JSON: ranges of ids.
            CREATE TABLE IF NOT EXISTS {pending_changes} (
                slot           text    NOT NULL,
                batch_id       bigint  NOT NULL,
                commit_lsn     pg_lsn  NOT NULL,
                commit_end_lsn pg_lsn  NOT NULL,
                xid            bigint  NOT NULL,
                changes        jsonb   NOT NULL,
                PRIMARY KEY (slot, batch_id, commit_lsn)
            );
            CREATE UNIQUE INDEX IF NOT EXISTS {quote_ident(RESULTS_TABLE + "_batch_idx")}
                ON {results} (slot, batch_id) WHERE kind = 'batch';
            CREATE INDEX IF NOT EXISTS {quote_ident(RESULTS_TABLE + "_violation_idx")}
                ON {results} (slot, id) WHERE result = 'violation';
            -- The report's latest batches of the change mix: without it, a long insert-only
            -- run would be read whole to find none.
            CREATE INDEX IF NOT EXISTS {quote_ident(RESULTS_TABLE + "_changed_idx")}
                ON {results} (slot, id)
                WHERE kind = 'batch' AND (updated > 0 OR deleted > 0);
        """
        self.verify_ddl = self.ledger_indexes_ddl + verify_tables
        self.ledger_exists = "SELECT to_regclass($1)"
        # `cdcfeed status`: a verifier's verdict on each of these batches.
        self.batch_verdicts = f"""
            SELECT batch_id, result FROM {results}
            WHERE slot = $1 AND kind = 'batch' AND batch_id = ANY($2::bigint[])
        """

        # --- replication slots and publications -------------------------------------------
        self.slot = """
            SELECT slot_name::text, plugin::text, slot_type, database::text, active,
                   active_pid, confirmed_flush_lsn, current_database()::text AS here
            FROM pg_replication_slots WHERE slot_name = $1
        """
        self.create_slot = "SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')"
        self.advance_slot = "SELECT end_lsn FROM pg_replication_slot_advance($1, $2::pg_lsn)"
        self.flush_lsn = "SELECT pg_current_wal_flush_lsn()"
        self.insert_lsn = "SELECT pg_current_wal_insert_lsn()"
        self.publication = """
            SELECT puballtables,
                   ARRAY(SELECT schemaname || '.' || tablename FROM pg_publication_tables t
                         WHERE t.pubname = p.pubname)
            FROM pg_publication p WHERE pubname = $1
        """
        self.publication_tables = f"{self.qualified_orders}, {batches}"
        # The tables a publication must cover, as (quoted, as pg_publication_tables names it).
        self.published = (
            (self.qualified_orders, ".".join(names.orders_relation)),
            (batches, f"{names.schema}.{names.batches}"),
        )

        # --- reading the stream --------------------------------------------------------------
        # Peek, not get: the slot is advanced only after what was read is committed here,
        # so a connection lost mid-chunk re-reads the chunk instead of losing it.
        self.peek = """
            SELECT data FROM pg_logical_slot_peek_binary_changes(
                $1, $2::pg_lsn, $3, 'proto_version', '1', 'publication_names', $4)
        """
        # One chunk ends at a transaction's end: a batch of millions of rows is one chunk,
        # which may take longer than a statement timeout meant for the load.
        self.no_statement_timeout = "SET LOCAL statement_timeout = 0"
        self.try_lock = "SELECT pg_try_advisory_lock(hashtextextended('cdcfeed verify ' || $1, 0))"
        self.progress = f"""
            SELECT scope_lsn, position, checked, waiting FROM {progress} WHERE slot = $1
        """
        self.start_progress = f"""
            INSERT INTO {progress} (slot, publication, scope_lsn, position, checked)
            VALUES ($1, $2, $3, $3, $3)
        """
        self.forget_slot = tuple(
            f"DELETE FROM {table} WHERE slot = $1"
            for table in (progress, pending, pending_changes, results)
        )
        self.set_position = f"""
            UPDATE {progress} SET position = $2, publication = $3, updated_at = now()
            WHERE slot = $1
        """
        self.set_checked = f"""
            UPDATE {progress} SET checked = $2, waiting = $3, updated_at = now() WHERE slot = $1
        """
        self.record_pending = f"""
            INSERT INTO {pending} (slot, batch_id, commit_lsn, commit_end_lsn, xid, rows,
                                   min_order_id, max_order_id, sum_order_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ON CONFLICT DO NOTHING
        """
        self.record_pending_changes = f"""
            INSERT INTO {pending_changes} (slot, batch_id, commit_lsn, commit_end_lsn, xid,
                                           changes)
            VALUES ($1, $2, $3, $4, $5, $6::jsonb)
            ON CONFLICT DO NOTHING
        """
        self.record_stream_violation = f"""
            INSERT INTO {results} (slot, kind, batch_id, result, xid, commit_lsn, reason)
            VALUES ($1, 'stream', $2, 'violation', $3, $4, $5)
        """

        # --- verdicts ----------------------------------------------------------------------
        # Batches the stream carried that can be judged now: settled, absent from the
        # ledger, or judged before (a later transaction carried more of their rows).
        self.ready_pending = f"""
            SELECT p.batch_id, b.status, b.row_count, b.first_order_id, b.start_lsn,
                   b.end_lsn, b.xid::text AS xid, r.id AS verdict_id, {_CHANGE_COLUMNS}
            FROM (SELECT batch_id FROM {pending} WHERE slot = $1
                  UNION
                  SELECT batch_id FROM {pending_changes} WHERE slot = $1) p
            LEFT JOIN {batches} b ON b.batch_id = p.batch_id
            LEFT JOIN {results} r
                ON r.slot = $1 AND r.kind = 'batch' AND r.batch_id = p.batch_id
            WHERE b.batch_id IS NULL OR b.status <> 'IN_PROGRESS' OR r.id IS NOT NULL
            ORDER BY p.batch_id
            LIMIT $2
        """
        self.pending_of = f"""
            SELECT batch_id, commit_lsn, commit_end_lsn, xid, rows, min_order_id,
                   max_order_id, sum_order_id
            FROM {pending} WHERE slot = $1 AND batch_id = ANY($2::bigint[])
            ORDER BY batch_id, commit_lsn
        """
        self.pending_changes_of = f"""
            SELECT batch_id, changes::text AS changes
            FROM {pending_changes} WHERE slot = $1 AND batch_id = ANY($2::bigint[])
            ORDER BY batch_id, commit_lsn
        """
        self.drop_pending = tuple(
            f"DELETE FROM {table} WHERE slot = $1 AND batch_id = ANY($2::bigint[])"
            for table in (pending, pending_changes)
        )
        self.record_verdict = f"""
            INSERT INTO {results} (slot, kind, batch_id, status, result, rows, xid,
                                   commit_lsn, reason, updated, deleted, unchanged_toast,
                                   resolved_toast)
            VALUES ($1, 'batch', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        """
        self.amend_verdict = f"""
            UPDATE {results}
            SET result = 'violation', verified_at = now(),
                reason = CASE WHEN result = 'ok' THEN $2 ELSE reason || '; ' || $2 END
            WHERE id = $1
        """
        # Settled batches the stream did not carry, in three index ranges: opened since the
        # last verdicts ($3), IN_PROGRESS then ($4), or COMPLETED with an end_lsn the stream
        # has passed since ($3, $5]. A COMPLETED batch whose end_lsn is still ahead of the
        # stream waits; the third range takes it up later.
        self.unobserved = f"""
            WITH candidates AS (
                SELECT batch_id FROM {batches} WHERE start_lsn >= $3
                UNION
                SELECT unnest($4::bigint[])
                UNION
                SELECT batch_id FROM {batches}
                WHERE status = 'COMPLETED' AND end_lsn > $3 AND end_lsn <= $5
            )
            SELECT b.batch_id, b.status, b.row_count, b.end_lsn, {_CHANGE_COLUMNS}
            FROM candidates c JOIN {batches} b ON b.batch_id = c.batch_id
            WHERE b.start_lsn >= $2
              AND (b.status = 'FAILED' OR (b.status = 'COMPLETED' AND b.end_lsn <= $5))
              AND NOT EXISTS (SELECT 1 FROM {results} r
                              WHERE r.slot = $1 AND r.kind = 'batch'
                                AND r.batch_id = b.batch_id)
              AND NOT EXISTS (SELECT 1 FROM {pending} p
                              WHERE p.slot = $1 AND p.batch_id = b.batch_id)
              AND NOT EXISTS (SELECT 1 FROM {pending_changes} p
                              WHERE p.slot = $1 AND p.batch_id = b.batch_id)
            ORDER BY b.batch_id
            LIMIT $6
        """
        self.in_progress_since = f"""
            SELECT coalesce(array_agg(batch_id ORDER BY batch_id), '{{}}')
            FROM {batches} WHERE status = 'IN_PROGRESS' AND start_lsn >= $1
        """

        # --- the report ----------------------------------------------------------------------
        self.totals = f"""
            SELECT count(*) FILTER (WHERE kind = 'batch' AND status IS NOT NULL) AS batches,
                   count(*) FILTER (WHERE kind = 'batch' AND status = 'COMPLETED') AS completed,
                   count(*) FILTER (WHERE kind = 'batch' AND status = 'FAILED') AS failed,
                   coalesce(sum(rows) FILTER (WHERE kind = 'batch'), 0)::bigint AS rows,
                   coalesce(sum(updated), 0)::bigint AS updated,
                   coalesce(sum(deleted), 0)::bigint AS deleted,
                   coalesce(sum(unchanged_toast), 0)::bigint AS unchanged_toast,
                   coalesce(sum(resolved_toast), 0)::bigint AS resolved_toast,
                   count(*) FILTER (WHERE result = 'violation') AS violations
            FROM {results} WHERE slot = $1
        """
        # The latest verdicts of batches that updated or deleted, for the report.
        self.changed_batches = f"""
            SELECT batch_id, result, rows, updated, deleted, unchanged_toast, resolved_toast
            FROM {results}
            WHERE slot = $1 AND kind = 'batch' AND (updated > 0 OR deleted > 0)
            ORDER BY id DESC LIMIT $2
        """
        self.violations = f"""
            SELECT batch_id, reason FROM {results}
            WHERE slot = $1 AND result = 'violation' ORDER BY id LIMIT $2
        """
        self.waiting = f"""
            SELECT (SELECT count(*) FROM (SELECT batch_id FROM {pending} WHERE slot = $1
                                          UNION
                                          SELECT batch_id FROM {pending_changes}
                                          WHERE slot = $1) p)
                 + (SELECT count(*) FROM {batches} b
                    WHERE b.status = 'COMPLETED' AND b.end_lsn > $2 AND b.start_lsn >= $3
                      AND NOT EXISTS (SELECT 1 FROM {results} r
                                      WHERE r.slot = $1 AND r.kind = 'batch'
                                        AND r.batch_id = b.batch_id))
                 + cardinality($4::bigint[])
        """

        # --- slot monitoring -----------------------------------------------------------------
        # Two variants, for servers with and without safe_wal_size (`watched_slots`).
        self._watched_slots = tuple(
            f"""
            SELECT slot_name::text, active, confirmed_flush_lsn, restart_lsn,
                   {safe_wal_size} AS safe_wal_size, pg_current_wal_insert_lsn() AS insert_lsn
            FROM pg_replication_slots
            WHERE slot_type = 'logical' AND database = current_database()
              AND (cardinality($1::text[]) = 0 OR slot_name = ANY($1::text[]))
            ORDER BY slot_name
            """
            for safe_wal_size in ("NULL::bigint", "safe_wal_size")
        )
        self.in_progress_ids = f"SELECT batch_id FROM {batches} WHERE status = 'IN_PROGRESS'"
        # The batches a slot confirmed since the last poll: end_lsn in (previous, current],
        # plus those IN_PROGRESS at the last poll, whose COMPLETED mark may have committed
        # after the slot had already passed their end_lsn.
        self.newly_confirmed = f"""
            SELECT batch_id,
                   greatest(0, extract(epoch FROM statement_timestamp() - completed_at))::float8
            FROM {batches}
            WHERE status = 'COMPLETED' AND end_lsn > $2 AND end_lsn <= $1
            UNION
            SELECT batch_id,
                   greatest(0, extract(epoch FROM statement_timestamp() - completed_at))::float8
            FROM {batches}
            WHERE batch_id = ANY($3::bigint[]) AND status = 'COMPLETED' AND end_lsn <= $1
        """
        self.unconfirmed = f"""
            SELECT count(*) FROM {batches} WHERE status = 'COMPLETED' AND end_lsn > $1
        """

    def watched_slots(self, server_major: int) -> str:
        """The watched logical slots of this database, for a server of this major version."""
        return self._watched_slots[server_major >= SAFE_WAL_SIZE_SINCE]

    @staticmethod
    def create_publication(publication: str, tables: str) -> str:
        return f"CREATE PUBLICATION {quote_ident(publication)} FOR TABLE {tables}"

    @staticmethod
    def add_to_publication(publication: str, table: str) -> str:
        return f"ALTER PUBLICATION {quote_ident(publication)} ADD TABLE {table}"

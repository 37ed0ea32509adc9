"""The SQL of `verify --kafka`'s state: verdicts in verify's results table under the source
name `kafka:<group>`, and three tables of its own: how far the topics were read (and which
pipeline's topics the group reads), and the digests of the latest judged batches (what their
rows were, to tell an identical redelivery from one that differs).

Identifiers are quoted in `names.py`; values are always parameters.
"""

from __future__ import annotations

from cdcfeed.database.names import RESULTS_TABLE, Names, quote_ident

KAFKA_PROGRESS_TABLE = "cdcfeed_verify_kafka"
KAFKA_POSITIONS_TABLE = "cdcfeed_verify_kafka_positions"
KAFKA_DIGESTS_TABLE = "cdcfeed_verify_kafka_digests"

# How long an INSERT of a ledger row may stay uncommitted after reading its start_lsn: the
# low-water mark stays this far behind, so a batch that commits late is never passed over.
OPENING_MARGIN = "5 minutes"


class KafkaStatements:
    def __init__(self, names: Names) -> None:
        batches = names.table(names.batches)
        results = names.table(RESULTS_TABLE)
        progress = names.table(KAFKA_PROGRESS_TABLE)
        positions = names.table(KAFKA_POSITIONS_TABLE)
        digests = names.table(KAFKA_DIGESTS_TABLE)

        self.ddl = f"""
            -- One row per Kafka verifier (source 'kafka:<group>'). scope_lsn: the lowest
            -- source.lsn the orders topic delivered (batches before it are not judged);
            -- low_water: every batch starting before it is judged or out of scope.
            CREATE TABLE IF NOT EXISTS {progress} (
                source          text        PRIMARY KEY,
                scope_lsn       pg_lsn,
                low_water       pg_lsn,
                duplicates      bigint      NOT NULL DEFAULT 0,
                snapshot_events bigint      NOT NULL DEFAULT 0,
                tombstones      bigint      NOT NULL DEFAULT 0,
                updated_at      timestamptz NOT NULL DEFAULT now()
            );
            -- The pipeline whose topics the group verifies (claimed by its first run).
            ALTER TABLE {progress}
                ADD COLUMN IF NOT EXISTS topic_prefix text,
                ADD COLUMN IF NOT EXISTS orders_topic text;
            -- The change mix: updates and deletes of the batches judged, and the updates
            -- whose after image lacked the TOASTed note (Debezium's placeholder).
            ALTER TABLE {progress}
                ADD COLUMN IF NOT EXISTS updated bigint NOT NULL DEFAULT 0,
                ADD COLUMN IF NOT EXISTS deleted bigint NOT NULL DEFAULT 0,
                ADD COLUMN IF NOT EXISTS unchanged_toast bigint NOT NULL DEFAULT 0;
            -- Per partition read: every record before `position` is accounted for by the
            -- stored verdicts (or belongs to a batch not judged yet, whose rows are read
            -- again after a restart); high_lsn: the highest source.lsn it delivered before
            -- the offset committed with it (where a restart reads from).
            CREATE TABLE IF NOT EXISTS {positions} (
                source    text    NOT NULL,
                topic     text    NOT NULL,
                partition integer NOT NULL,
                position  bigint  NOT NULL,
                high_lsn  pg_lsn,
                PRIMARY KEY (source, topic, partition)
            );
            -- Per judged batch that delivered rows: its digest (proof/kafka/digest.py).
            -- upto: how many rows this source digested, this batch's included; the digests
            -- whose upto lies more than the retention below the latest are deleted.
            CREATE TABLE IF NOT EXISTS {digests} (
                source   text   NOT NULL,
                batch_id bigint NOT NULL,
                upto     bigint NOT NULL,
                digest   bytea  NOT NULL,
                PRIMARY KEY (source, batch_id)
            );
            CREATE INDEX IF NOT EXISTS {quote_ident(KAFKA_DIGESTS_TABLE + "_upto_idx")}
                ON {digests} (source, upto);
        """
        self.pipeline = f"""
            SELECT topic_prefix, orders_topic FROM {progress} WHERE source = $1
        """
        self.claim = f"""
            UPDATE {progress} SET topic_prefix = $2, orders_topic = $3
            WHERE source = $1 AND topic_prefix IS NULL
        """
        self.digested = f"SELECT coalesce(max(upto), 0) FROM {digests} WHERE source = $1"
        self.save_digest = f"""
            INSERT INTO {digests} (source, batch_id, upto, digest) VALUES ($1, $2, $3, $4)
            ON CONFLICT (source, batch_id)
            DO UPDATE SET upto = EXCLUDED.upto, digest = EXCLUDED.digest
        """
        self.prune_digests = f"DELETE FROM {digests} WHERE source = $1 AND upto <= $2"
        self.start = f"""
            INSERT INTO {progress} (source) VALUES ($1) ON CONFLICT (source) DO NOTHING
        """
        self.progress = f"""
            SELECT scope_lsn, low_water, duplicates, snapshot_events, tombstones, updated,
                   deleted, unchanged_toast
            FROM {progress} WHERE source = $1
        """
        self.positions = f"""
            SELECT topic, partition, position, high_lsn FROM {positions} WHERE source = $1
        """
        self.save_position = f"""
            INSERT INTO {positions} (source, topic, partition, position, high_lsn)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (source, topic, partition)
            DO UPDATE SET position = EXCLUDED.position, high_lsn = EXCLUDED.high_lsn
        """
        self.save_progress = f"""
            UPDATE {progress}
            SET scope_lsn = CASE WHEN scope_lsn IS NULL OR $2 < scope_lsn THEN $2
                                 ELSE scope_lsn END,
                low_water = greatest(low_water, $3),
                duplicates = duplicates + $4, snapshot_events = snapshot_events + $5,
                tombstones = tombstones + $6, updated = updated + $7, deleted = deleted + $8,
                unchanged_toast = unchanged_toast + $9, updated_at = now()
            WHERE source = $1
        """
        # What a batch of the change mix changed, read through the row's JSON: a ledger
        # older than the change mix (never upgraded by a load) lacks the columns, and its
        # batches are insert-only (NULL ids, counts 0).
        mix_columns = """
            coalesce((to_jsonb(b) ->> 'updated')::int, 0) AS updated,
            coalesce((to_jsonb(b) ->> 'deleted')::int, 0) AS deleted,
            CASE WHEN jsonb_typeof(to_jsonb(b) -> 'updated_ids') = 'array' THEN ARRAY(
                SELECT jsonb_array_elements_text(to_jsonb(b) -> 'updated_ids')::bigint)
            END AS updated_ids,
            CASE WHEN jsonb_typeof(to_jsonb(b) -> 'deleted_ids') = 'array' THEN ARRAY(
                SELECT jsonb_array_elements_text(to_jsonb(b) -> 'deleted_ids')::bigint)
            END AS deleted_ids
        """
        ledger_columns = f"""
            b.batch_id, b.status, b.row_count, b.first_order_id, b.start_lsn, b.end_lsn,
            b.xid::text AS xid, extract(epoch FROM b.completed_at)::float8 AS completed_at,
            {mix_columns}
        """
        # Which of these batch ids were judged before, with their ledger rows and digests.
        self.judged_among = f"""
            SELECT r.batch_id, r.rows, b.status, b.row_count, b.first_order_id, b.start_lsn,
                   b.end_lsn, b.xid::text AS xid, d.digest
            FROM {results} r
            LEFT JOIN {batches} b ON b.batch_id = r.batch_id
            LEFT JOIN {digests} d ON d.source = r.slot AND d.batch_id = r.batch_id
            WHERE r.slot = $1 AND r.kind = 'batch' AND r.batch_id = ANY($2::bigint[])
        """
        # The judged batches that ran these transactions ($2: 32-bit xids, $3: the LSN of a
        # change of each). A batch's changes follow its start_lsn, so its row is the latest
        # started before the change with that xid: a backward walk of the start_lsn index
        # from the change, past the few batches started since (and never an older batch of
        # the same 32-bit xid, an epoch earlier). Status NULL for none.
        self.judged_by_xid = f"""
            SELECT {ledger_columns}
            FROM unnest($2::bigint[], $3::pg_lsn[]) AS h (xid, lsn)
            CROSS JOIN LATERAL (
                SELECT * FROM {batches} s
                WHERE s.start_lsn < h.lsn AND (s.xid::text::bigint % 4294967296) = h.xid
                ORDER BY s.start_lsn DESC
                LIMIT 1
            ) b
            WHERE EXISTS (SELECT 1 FROM {results} r
                          WHERE r.slot = $1 AND r.kind = 'batch' AND r.batch_id = b.batch_id)
        """
        # The replica identity of a table ($1 schema, $2 name): d default, f full, n
        # nothing, i an index; and the WAL position it was read at (changes below it may
        # predate an ALTER TABLE that set it; a standby's: the position it replayed).
        self.replica_identity = """
            SELECT (SELECT c.relreplident::text FROM pg_class c
                    JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname = $1 AND c.relname = $2),
                   CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                        ELSE pg_current_wal_insert_lsn() END
        """
        self.ledger_rows = f"""
            SELECT {ledger_columns} FROM {batches} b WHERE b.batch_id = ANY($1::bigint[])
        """
        # The batches not judged yet that start at or after the low-water mark.
        self.unjudged = f"""
            SELECT {ledger_columns} FROM {batches} b
            WHERE b.start_lsn >= $2
              AND NOT EXISTS (SELECT 1 FROM {results} r
                              WHERE r.slot = $1 AND r.kind = 'batch'
                                AND r.batch_id = b.batch_id)
            ORDER BY b.start_lsn
            LIMIT $3
        """
        # Where the low-water mark may move: the oldest start of a batch not judged yet, but
        # never past a batch opened within the margin (its row may not be visible yet).
        self.next_low_water = f"""
            SELECT min(b.start_lsn) FROM {batches} b
            WHERE b.start_lsn >= $2
              AND (b.started_at > now() - interval '{OPENING_MARGIN}'
                   OR NOT EXISTS (SELECT 1 FROM {results} r
                                  WHERE r.slot = $1 AND r.kind = 'batch'
                                    AND r.batch_id = b.batch_id))
        """
        self.last_start = f"SELECT max(start_lsn) FROM {batches} WHERE start_lsn >= $1"
        self.amend = f"""
            UPDATE {results}
            SET result = 'violation', verified_at = now(),
                reason = CASE WHEN result = 'ok' THEN $3 ELSE reason || '; ' || $3 END
            WHERE slot = $1 AND kind = 'batch' AND batch_id = $2
        """

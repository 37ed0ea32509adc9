"""The proof of delivery: every batch the ledger settled reached the change stream whole.

One folder per kind of change stream, each with the same parts: what it decodes, how it
reads (and where it has read to), the verifier's state, a runner, a report. `slot/` reads a
logical replication slot with pgoutput, as Debezium does; `kafka/` reads what Debezium
delivered to Kafka. Both turn what they read into `events.ChangeEvent`s, `events.OrderChange`s
(updates and deletes) and `events.TransactionEnd`s, which `fold` folds into
`events.Observation`s (one per transaction and batch), `events.ChangeObservation`s (one per
transaction) and `events.StreamEvent`s (changes cdcfeed never makes); `judge` turns those and
the ledger's `LedgerBatch`es into verdicts by the same rules for every stream. A new kind of
stream is a new folder that feeds `fold`: the judge does not change.
"""

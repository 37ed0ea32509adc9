"""A logical replication slot, read with pgoutput: `pgoutput` decodes the protocol, `stream`
folds its messages, `reader` reads and advances the slot, `state` keeps the proof in the
database, `runner` is `cdcfeed verify --slot` and the daemon's verify task."""

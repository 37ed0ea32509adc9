"""What Debezium delivered to Kafka: `debezium` decodes the JsonConverter events, `consumer`
reads the topics, `delivery` folds them and decides when a batch is due, `state` keeps
verdicts and read positions, `runner` is `cdcfeed verify --kafka` and the daemon's task."""

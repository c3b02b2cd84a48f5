"""The operator side (internal): what the CLI, and later metrics and a dashboard, read and
change in a running system, through a `db.Database` and never through a worker: dead letters
(`dead_letters`), queue depths and jobs waiting for later (`queues`), pruning
(`maintenance`).
"""

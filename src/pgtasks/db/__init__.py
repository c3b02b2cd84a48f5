"""The database layer (internal): every statement pgtasks sends to PostgreSQL lives here.

`connect` resolves the DSN, opens connections and the pool; `database` is the handle the
layers above share (`Database`); `errors` classifies database errors once; `embedded` runs
the embedded server. The SQL is split by what it is about: `send` (enqueueing), `jobs` (a
claimed job's life: claim, ack, retry, release, dead letter, lease extension),
`attempt_errors`, `dead_letters`, `queues`, `keys`, and `schema` with its `migrations/`.
`sql` holds what they share.
"""

"""The producer side (internal): sending jobs (`enqueue`) and following the jobs sent
(`jobs`); later job handles, results and cancellation. It takes a `db.Database`, never an
`App`.
"""

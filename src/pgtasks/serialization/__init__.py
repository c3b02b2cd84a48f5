"""The wire format (internal): how a call of a task becomes a message and comes back.

`envelope` is the message body and the header names (what other languages and SQL write);
`shapes` and `hints` turn a task's type hints into the checks a producer runs on Python values
and the loaders a worker runs on the JSON that arrives. Nothing here touches a database.
"""

"""Periodic jobs (internal; the public API is `App.periodic` and `App.schedule`): when a
schedule ticks (`timing`: cron expressions in a time zone, fixed intervals, the rule for
daylight-saving days) and what a schedule is (`schedule`: its definition, its catch-up
policy, and which ticks a scheduler pass enqueues). Pure: nothing here reads a clock or
touches a database; the scheduler (``worker/scheduler.py``) does, on the database clock.
"""

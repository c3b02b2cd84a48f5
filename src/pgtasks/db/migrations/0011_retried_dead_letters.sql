-- pgtasks 0011: a dead letter that is retried leaves a record of the job that failed.
--
-- Retrying a dead letter sends its message again as a new job and deletes the dead letter;
-- the job that failed was then known nowhere, and its handle answered "unknown". The retry
-- now records it in pgtasks.job_results, in the same statement, with state 'failed' and as
-- error its last error, the reason it was dead-lettered, the attempts it used and the id of
-- the job it was retried as ("retried_as"); the record is kept for the app's result_ttl,
-- like any other. pgtasks.job_info reads a record before anything else, so it needs no
-- change.

-- NOT VALID: the rows there satisfy the narrower check they were written under, and a
-- validating scan of a large results table would hold its lock for nothing.
ALTER TABLE pgtasks.job_results DROP CONSTRAINT job_results_state_check;
ALTER TABLE pgtasks.job_results ADD CONSTRAINT job_results_state_check
    CHECK (state IN ('succeeded', 'failed', 'cancelled', 'expired')) NOT VALID;

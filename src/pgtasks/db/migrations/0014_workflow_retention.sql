-- pgtasks 0014: finished workflows can be pruned.
--
-- A workflow's rows (the workflow and one per step, with each step's body and result) were
-- kept for ever: a deployment that runs a workflow per order kept every order's. `prune`
-- now deletes the workflows finished (succeeded, failed or cancelled) longer ago than its
-- --workflows-older-than (7 days by default), their steps with them (ON DELETE CASCADE).
-- A running workflow is never pruned. A step that ends after its workflow was pruned (a
-- member still retrying when its group had failed) finds no workflow, and its end moves
-- nothing on: pgtasks.workflow_step_ended returns at once for a workflow that is gone.
--
-- This index lets each batch of the prune take the oldest finished workflows without
-- reading the running ones or sorting the table. It is built in migrate's transaction,
-- which holds a lock on pgtasks.workflows while it does: on a table of millions of
-- workflows, run migrate when few are being deferred.

CREATE INDEX workflows_finished ON pgtasks.workflows (finished_at) WHERE state <> 'running';

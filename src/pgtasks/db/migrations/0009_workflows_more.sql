-- pgtasks 0009: three holes in the workflows of 0005, found by attacking them.
--
-- 1. A step's job cancelled before it ran (pgtasks.cancel: `pgtasks cancel`, JobRef.cancel,
--    the dashboard) was removed from its queue without telling its workflow, which then
--    stayed running forever (its result() never returned). pgtasks.cancel now ends the
--    step in the same transaction, as the worker does for a step cancelled while it runs:
--    the workflow ends as cancelled, naming the step. The previous function is kept under
--    another name and called (as 0008 does for grant_roles).
-- 2. A step whose return value could not be encoded ended as succeeded with no result, and
--    only a chain whose next step receives the result noticed. A chord's callback received
--    null in its place, a group's results() and a chain's result() returned None. The
--    workflow now fails at that step wherever its result is needed: a member of a group or
--    chord, a chord's callback, a chain's last step, or a step whose next step receives it.
-- 3. pgtasks.workflow_cancel locked the workflow's row, then each sent step's message; a
--    worker acknowledging a member holds the member's message, then wants the workflow's
--    row. The two deadlocked, and PostgreSQL failed one of them (the cancel, usually).
--    The cancel now locks in the worker's order: the sent steps' messages first (waiting
--    for an acknowledgement in progress to commit), then the workflow. Should two
--    workers' batches still make a cycle with it, its attempt is a savepoint and it tries
--    again.

ALTER FUNCTION pgtasks.cancel(text, bigint[], double precision) RENAME TO cancel_before_0009;
REVOKE ALL ON FUNCTION pgtasks.cancel_before_0009(text, bigint[], double precision) FROM PUBLIC;

CREATE FUNCTION pgtasks.cancel(p_queue text, p_ids bigint[], p_ttl double precision DEFAULT 604800)
RETURNS TABLE (msg_id bigint, outcome text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r  record;
BEGIN
    FOR r IN SELECT c.msg_id AS id, c.outcome AS result
             FROM pgtasks.cancel_before_0009(p_queue, p_ids, p_ttl) AS c LOOP
        IF r.result = 'cancelled' THEN  -- removed before it ran: a step ends here
            PERFORM pgtasks.workflow_step_ended(
                s.workflow_id, s.step, 'cancelled', NULL,
                jsonb_build_object('reason', 'cancelled before it ran'))
            FROM pgtasks.workflow_steps AS s
            WHERE s.queue = p_queue AND s.msg_id = r.id;
        END IF;
        msg_id := r.id;
        outcome := r.result;
        RETURN NEXT;
    END LOOP;
END $$;
REVOKE ALL ON FUNCTION pgtasks.cancel(text, bigint[], double precision) FROM PUBLIC;

CREATE OR REPLACE FUNCTION pgtasks.workflow_step_ended(
    p_workflow bigint, p_step integer, p_outcome text, p_result jsonb, p_error jsonb
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    w           pgtasks.workflows;
    v_members   integer;
    v_results   jsonb;
BEGIN
    SELECT * INTO w FROM pgtasks.workflows WHERE id = p_workflow FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;  -- pruned: nothing to move on
    END IF;
    UPDATE pgtasks.workflow_steps
        SET state = CASE p_outcome WHEN 'succeeded' THEN 'succeeded'
                                   WHEN 'cancelled' THEN 'cancelled' ELSE 'failed' END,
            result = p_result, finished_at = now()
        WHERE workflow_id = p_workflow AND step = p_step
          AND state NOT IN ('succeeded', 'failed', 'cancelled');
    IF NOT FOUND OR w.state <> 'running' THEN
        RETURN;  -- this step's end was written already, or the workflow is over
    END IF;
    IF p_outcome <> 'succeeded' THEN
        PERFORM pgtasks.workflow_finish(
            p_workflow, CASE p_outcome WHEN 'cancelled' THEN 'cancelled' ELSE 'failed' END,
            p_step, coalesce(p_error, '{}') || jsonb_build_object('outcome', p_outcome));
        RETURN;
    END IF;
    -- succeeded without a result (it could not be encoded: p_error says why), where one
    -- is needed: only a chain's step followed by an immutable one can do without
    IF p_error IS NOT NULL AND (
        w.kind <> 'chain' OR p_step = w.steps - 1
        OR (SELECT pass_result FROM pgtasks.workflow_steps
            WHERE workflow_id = p_workflow AND step = p_step + 1)) THEN
        PERFORM pgtasks.workflow_finish(p_workflow, 'failed', p_step,
                                        p_error || jsonb_build_object('outcome', 'succeeded'));
        RETURN;
    END IF;
    IF w.kind = 'chain' THEN
        IF p_step = w.steps - 1 THEN
            PERFORM pgtasks.workflow_finish(p_workflow, 'succeeded', NULL, NULL);
        ELSE
            PERFORM pgtasks.workflow_send(p_workflow, p_step + 1, p_result);
        END IF;
        RETURN;
    END IF;
    v_members := CASE w.kind WHEN 'chord' THEN w.steps - 1 ELSE w.steps END;
    IF p_step >= v_members THEN  -- a chord's callback
        PERFORM pgtasks.workflow_finish(p_workflow, 'succeeded', NULL, NULL);
        RETURN;
    END IF;
    -- the chord's (or group's) counter: the member that brings it to zero, in its own
    -- acknowledgement's transaction, sends the callback (or ends the group)
    UPDATE pgtasks.workflows SET pending = pending - 1 WHERE id = p_workflow
        RETURNING * INTO w;
    IF w.pending > 0 THEN
        RETURN;
    END IF;
    IF w.kind = 'group' THEN
        PERFORM pgtasks.workflow_finish(p_workflow, 'succeeded', NULL, NULL);
        RETURN;
    END IF;
    SELECT jsonb_agg(result ORDER BY step) INTO v_results
        FROM pgtasks.workflow_steps WHERE workflow_id = p_workflow AND step < v_members;
    PERFORM pgtasks.workflow_send(p_workflow, v_members, v_results);
END $$;

CREATE OR REPLACE FUNCTION pgtasks.workflow_cancel(p_workflow bigint,
                                                    p_ttl double precision DEFAULT 604800)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_n      integer;
    v_tries  integer := 0;
    s        record;
BEGIN
    LOOP
        BEGIN
            v_n := 0;
            FOR s IN SELECT queue, msg_id FROM pgtasks.workflow_steps
                     WHERE workflow_id = p_workflow AND state = 'sent' ORDER BY queue, msg_id
            LOOP
                IF to_regclass(format('pgmq.%I', 'q_' || s.queue)) IS NOT NULL THEN
                    EXECUTE format('SELECT 1 FROM pgmq.%I WHERE msg_id = $1 FOR UPDATE',
                                   'q_' || s.queue) USING s.msg_id;
                END IF;
            END LOOP;
            PERFORM 1 FROM pgtasks.workflows WHERE id = p_workflow AND state = 'running'
                FOR UPDATE;
            IF NOT FOUND THEN
                RETURN 0;
            END IF;
            PERFORM pgtasks.workflow_finish(p_workflow, 'cancelled', NULL,
                                            jsonb_build_object('reason', 'cancelled'));
            FOR s IN SELECT queue, msg_id FROM pgtasks.workflow_steps
                     WHERE workflow_id = p_workflow AND state = 'sent' ORDER BY step LOOP
                v_n := v_n + (SELECT count(*) FROM pgtasks.cancel(s.queue, ARRAY[s.msg_id], p_ttl)
                              AS c WHERE c.outcome IN ('cancelled', 'requested'));
            END LOOP;
            RETURN v_n;
        EXCEPTION WHEN deadlock_detected THEN
            v_tries := v_tries + 1;  -- a step's acknowledgement went first: try again
            IF v_tries >= 5 THEN
                RAISE;
            END IF;
        END;
    END LOOP;
END $$;

-- the group roles' grants (0004's grant on pgtasks.cancel names the function anew), for
-- roles granted before this migration; a no-op without roles
SELECT pgtasks.grant_job_results();
DO $$
BEGIN
    IF to_regrole('pgtasks_producer') IS NOT NULL AND to_regrole('pgtasks_worker') IS NOT NULL
    THEN
        REVOKE ALL ON FUNCTION pgtasks.cancel_before_0009(text, bigint[], double precision)
            FROM pgtasks_producer, pgtasks_worker;
    END IF;
END $$;

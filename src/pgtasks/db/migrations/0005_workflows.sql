-- pgtasks 0005: workflows (chain, group, chord), handed from step to step in the
-- transaction that acknowledges each step.
--
-- A workflow is a row, its steps are rows, and each step's message carries its place in
-- the header x-pgtasks-workflow ({"id": W, "step": k}). When a worker writes a step's end
-- (its ack, its move to the dead letters, its cancellation or expiry), it calls
-- pgtasks.workflow_step_ended in the same transaction: the next step of a chain, or a
-- chord's callback, is sent there and then, and the workflow's state moves on. A step whose
-- end is never written (its worker died) runs again and ends later; nothing polls.

CREATE TABLE pgtasks.workflows (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('chain', 'group', 'chord')),
    state        text NOT NULL DEFAULT 'running'
                 CHECK (state IN ('running', 'succeeded', 'failed', 'cancelled')),
    steps        integer NOT NULL,      -- a chord's callback included
    pending      integer NOT NULL,      -- group/chord: members not yet succeeded
    failed_step  integer,
    error        jsonb,
    on_error     jsonb,                 -- {"queue", "body", "headers"} of the error callback
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);

CREATE TABLE pgtasks.workflow_steps (
    workflow_id  bigint NOT NULL REFERENCES pgtasks.workflows ON DELETE CASCADE,
    step         integer NOT NULL,
    queue        text NOT NULL,
    task         text NOT NULL,
    body         jsonb NOT NULL,        -- the envelope as deferred, before a result is passed in
    headers      jsonb,
    delay        double precision NOT NULL DEFAULT 0,
    pass_result  boolean NOT NULL,      -- chain: the previous result as first argument;
                                        -- chord callback: the members' results, in order
    state        text NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'sent', 'succeeded', 'failed', 'cancelled')),
    msg_id       bigint,
    result       jsonb,
    sent_at      timestamptz,
    finished_at  timestamptz,
    PRIMARY KEY (workflow_id, step)
);
CREATE INDEX workflow_steps_message ON pgtasks.workflow_steps (queue, msg_id);

-- Send one step: its body with the result passed in (when it takes one), its headers with
-- its place in the workflow. Returns the message's id.
CREATE FUNCTION pgtasks.workflow_send(p_workflow bigint, p_step integer, p_passed jsonb)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    s     pgtasks.workflow_steps;
    v_id  bigint;
    v_body jsonb;
BEGIN
    SELECT * INTO s FROM pgtasks.workflow_steps WHERE workflow_id = p_workflow AND step = p_step;
    v_body := s.body;
    IF s.pass_result AND p_passed IS NOT NULL THEN
        v_body := jsonb_set(v_body, '{args}',
                            jsonb_build_array(p_passed) || coalesce(v_body -> 'args', '[]'));
    END IF;
    SELECT m.msg_id INTO v_id FROM pgtasks.send(
        s.queue, v_body,
        coalesce(s.headers, '{}') || jsonb_build_object(
            'x-pgtasks-workflow', jsonb_build_object('id', p_workflow, 'step', p_step)),
        s.delay) AS m;
    UPDATE pgtasks.workflow_steps SET state = 'sent', msg_id = v_id, sent_at = now()
        WHERE workflow_id = p_workflow AND step = p_step;
    RETURN v_id;
END $$;

-- Start a workflow: its steps (a JSON array of {"queue", "task", "body", "headers",
-- "delay", "pass_result"}, in order; a chord's callback last) and its error callback.
-- Sends what starts it (a chain's first step, every member of a group or chord) and
-- returns the workflow's id.
CREATE FUNCTION pgtasks.workflow_start(p_kind text, p_steps jsonb, p_on_error jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_n        integer := jsonb_array_length(p_steps);
    v_members  integer;
    v_id       bigint;
BEGIN
    IF v_n = 0 THEN
        RAISE EXCEPTION 'a workflow needs at least one step' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_members := CASE p_kind WHEN 'chord' THEN v_n - 1 WHEN 'group' THEN v_n ELSE 0 END;
    INSERT INTO pgtasks.workflows (kind, steps, pending, on_error)
        VALUES (p_kind, v_n, v_members, p_on_error) RETURNING id INTO v_id;
    INSERT INTO pgtasks.workflow_steps (workflow_id, step, queue, task, body, headers, delay,
                                        pass_result)
        SELECT v_id, s.i - 1, s.v ->> 'queue', s.v ->> 'task', s.v -> 'body',
               nullif(s.v -> 'headers', 'null'), coalesce((s.v ->> 'delay')::float8, 0),
               coalesce((s.v ->> 'pass_result')::boolean, false)
        FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS s(v, i);
    IF p_kind = 'chain' THEN
        PERFORM pgtasks.workflow_send(v_id, 0, NULL);
    ELSE
        PERFORM pgtasks.workflow_send(v_id, i, NULL) FROM generate_series(0, v_members - 1) AS i;
    END IF;
    RETURN v_id;
END $$;

-- A workflow is over: say so to whoever waits (channel pgtasks_done, payload '@workflows').
CREATE FUNCTION pgtasks.workflow_finish(p_workflow bigint, p_state text, p_step integer,
                                        p_error jsonb)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    w  pgtasks.workflows;
BEGIN
    UPDATE pgtasks.workflows
        SET state = p_state, finished_at = now(), failed_step = p_step, error = p_error
        WHERE id = p_workflow RETURNING * INTO w;
    PERFORM pg_notify('pgtasks_done', '@workflows');
    IF p_state = 'failed' AND w.on_error IS NOT NULL THEN
        PERFORM pgtasks.send(
            w.on_error ->> 'queue',
            jsonb_set(w.on_error -> 'body', '{args}',
                      jsonb_build_array(
                          jsonb_build_object('workflow', p_workflow, 'step', p_step,
                                             'queue', s.queue, 'id', s.msg_id, 'task', s.task),
                          coalesce(p_error, '{}'))
                      || coalesce(w.on_error -> 'body' -> 'args', '[]')),
            nullif(w.on_error -> 'headers', 'null'))
        FROM pgtasks.workflow_steps AS s WHERE s.workflow_id = p_workflow AND s.step = p_step;
    END IF;
END $$;

-- A step's job ended: 'succeeded' (with its result as JSON, or why it has none), 'failed',
-- 'cancelled' or 'expired'. Called by the worker in the transaction that writes that end,
-- once per step message (the end is guarded by the job's claim token). Moves the workflow on:
-- the next step of a chain, a chord's callback once its last member succeeded, or its end.
CREATE FUNCTION pgtasks.workflow_step_ended(
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
    IF w.kind = 'chain' THEN
        IF p_step = w.steps - 1 THEN
            PERFORM pgtasks.workflow_finish(p_workflow, 'succeeded', NULL, NULL);
        ELSIF p_error IS NOT NULL AND (SELECT pass_result FROM pgtasks.workflow_steps
                                       WHERE workflow_id = p_workflow AND step = p_step + 1) THEN
            PERFORM pgtasks.workflow_finish(p_workflow, 'failed', p_step,
                                            p_error || jsonb_build_object('outcome', 'succeeded'));
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

-- Cancel a workflow: its state is cancelled at once; its steps that were sent and have not
-- ended are cancelled as jobs are (removed if not started, asked to stop if running); the
-- steps not sent never will be. Returns how many step jobs were cancelled or asked to stop.
CREATE FUNCTION pgtasks.workflow_cancel(p_workflow bigint, p_ttl double precision DEFAULT 604800)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_n  integer := 0;
    s    record;
BEGIN
    PERFORM 1 FROM pgtasks.workflows WHERE id = p_workflow AND state = 'running' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    PERFORM pgtasks.workflow_finish(p_workflow, 'cancelled', NULL,
                                    jsonb_build_object('reason', 'cancelled'));
    FOR s IN SELECT queue, msg_id FROM pgtasks.workflow_steps
             WHERE workflow_id = p_workflow AND state = 'sent' LOOP
        v_n := v_n + (SELECT count(*) FROM pgtasks.cancel(s.queue, ARRAY[s.msg_id], p_ttl) AS c
                      WHERE c.outcome IN ('cancelled', 'requested'));
    END LOOP;
    RETURN v_n;
END $$;
REVOKE ALL ON FUNCTION pgtasks.workflow_cancel(bigint, double precision) FROM PUBLIC;

CREATE FUNCTION pgtasks.grant_workflows() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF to_regrole('pgtasks_producer') IS NULL OR to_regrole('pgtasks_worker') IS NULL THEN
        RETURN;
    END IF;
    GRANT SELECT, INSERT, UPDATE ON pgtasks.workflows, pgtasks.workflow_steps
        TO pgtasks_producer, pgtasks_worker;
    GRANT DELETE ON pgtasks.workflows, pgtasks.workflow_steps TO pgtasks_worker;
    GRANT EXECUTE ON FUNCTION
        pgtasks.workflow_send(bigint, integer, jsonb),
        pgtasks.workflow_start(text, jsonb, jsonb),
        pgtasks.workflow_finish(bigint, text, integer, jsonb),
        pgtasks.workflow_step_ended(bigint, integer, text, jsonb, jsonb),
        pgtasks.workflow_cancel(bigint, double precision)
        TO pgtasks_producer, pgtasks_worker;
END $$;
REVOKE ALL ON FUNCTION pgtasks.grant_workflows() FROM PUBLIC;
SELECT pgtasks.grant_workflows();

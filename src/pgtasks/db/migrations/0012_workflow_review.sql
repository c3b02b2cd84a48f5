-- pgtasks 0012: holes in workflows found by the review of issue 15: a workflow's later
-- steps and its error callback go to queues that may not exist when they are sent, and a
-- chord may have no members.
--
-- With queue creation off (pgtasks.settings.create_queues), a chain's next step, a chord's
-- callback or an error callback sent to a queue that does not exist made pgtasks.send
-- raise inside the transaction that acknowledges the step before. The acknowledgement
-- failed with it, the step's message came back after its lease and ran again, until it was
-- dead-lettered for its claims: a step that had succeeded ran several times, and its
-- workflow failed at the wrong step for the wrong reason.
--
-- 1. pgtasks.workflow_start checks every queue the workflow will send to (its steps' and
--    its error callback's) when it is deferred, as pgtasks.send checks one job's: a queue
--    that does not exist and may not be created is refused then (SQLSTATE PGQ01).
-- 2. A step whose queue is gone when it is to be sent (dropped after the defer) is not
--    sent: the workflow fails at that step, in the acknowledgement's transaction, with a
--    reason naming the queue (outcome "not sent"). An error callback whose queue is gone
--    is not sent either; the workflow's error says so.
-- 3. A chord of no members (its callback alone), which nothing would ever complete and so
--    would run forever, is refused when it is deferred.

-- Why no job can be sent to this queue now (it does not exist, and may not be created), or
-- NULL when one can. Raises nothing: it is asked inside acknowledgements.
CREATE FUNCTION pgtasks.workflow_queue_missing(p_queue text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT format('queue %s does not exist and queue creation on enqueue is off '
                  '(pgtasks.settings.create_queues)', quote_literal(p_queue))
    WHERE NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = p_queue)
      AND NOT coalesce((SELECT s.create_queues FROM pgtasks.settings AS s), true)
$$;

CREATE OR REPLACE FUNCTION pgtasks.workflow_start(p_kind text, p_steps jsonb,
                                                   p_on_error jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_n        integer := jsonb_array_length(p_steps);
    v_members  integer;
    v_id       bigint;
    v_queue    text;
BEGIN
    IF v_n = 0 THEN
        RAISE EXCEPTION 'a workflow needs at least one step' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_kind = 'chord' AND v_n < 2 THEN  -- no member would ever send its callback
        RAISE EXCEPTION 'a chord needs at least one member before its callback'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR v_queue IN SELECT DISTINCT q FROM (
                       SELECT s ->> 'queue' FROM jsonb_array_elements(p_steps) AS s
                       UNION ALL SELECT p_on_error ->> 'queue') AS t(q)
                   WHERE q IS NOT NULL ORDER BY q LOOP
        PERFORM pgtasks.queue_for_enqueue(v_queue, NULL);  -- raises PGQ01 when missing
    END LOOP;
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

CREATE OR REPLACE FUNCTION pgtasks.workflow_send(p_workflow bigint, p_step integer, p_passed jsonb)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    s         pgtasks.workflow_steps;
    v_id      bigint;
    v_body    jsonb;
    v_missing text;
BEGIN
    SELECT * INTO s FROM pgtasks.workflow_steps WHERE workflow_id = p_workflow AND step = p_step;
    v_missing := pgtasks.workflow_queue_missing(s.queue);
    IF v_missing IS NOT NULL THEN  -- not sent: the workflow fails here (see 2. above)
        UPDATE pgtasks.workflow_steps SET state = 'failed', finished_at = now()
            WHERE workflow_id = p_workflow AND step = p_step;
        PERFORM pgtasks.workflow_finish(
            p_workflow, 'failed', p_step,
            jsonb_build_object('reason', format('step %s could not be sent: %s', p_step, v_missing),
                               'outcome', 'not sent'));
        RETURN NULL;
    END IF;
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

CREATE OR REPLACE FUNCTION pgtasks.workflow_finish(p_workflow bigint, p_state text,
                                                    p_step integer, p_error jsonb)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    w          pgtasks.workflows;
    v_missing  text;
BEGIN
    UPDATE pgtasks.workflows
        SET state = p_state, finished_at = now(), failed_step = p_step, error = p_error
        WHERE id = p_workflow RETURNING * INTO w;
    PERFORM pg_notify('pgtasks_done', '@workflows');
    IF p_state <> 'failed' OR w.on_error IS NULL THEN
        RETURN;
    END IF;
    v_missing := pgtasks.workflow_queue_missing(w.on_error ->> 'queue');
    IF v_missing IS NOT NULL THEN  -- not sent (see 2. above); the workflow's error says so
        UPDATE pgtasks.workflows
            SET error = coalesce(error, '{}')
                        || jsonb_build_object('on_error', 'not sent: ' || v_missing)
            WHERE id = p_workflow;
        RETURN;
    END IF;
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
END $$;

-- pgtasks 0002: least privilege, and pgtasks.defer refusing what a worker could only
-- dead-letter.
--
-- Queues are created by one role. Until now pgmq.create ran as whichever role sent to a new
-- queue first: producers needed CREATE on schema pgmq, and the queue's tables belonged to
-- that producer, so a worker role granted its privileges beforehand could not read them.
-- ensure_queue now runs as its owner (the role that ran this migration), whoever calls it.
--
-- Two group roles (NOLOGIN), created by `migrate` when the migrating role may create roles,
-- carry exactly what each side needs; pgtasks.grant_roles() grants it, on the queues that
-- exist and, through default privileges, on every queue created later:
--   pgtasks_producer  enqueue: pgtasks.send, send_batch, defer (Python and SQL callers);
--   pgtasks_worker    run jobs (claim, ack, retry, dead-letter), enqueue (tasks defer other
--                     tasks), and operate: status, dead list|show|retry|purge, prune.

-- SECURITY DEFINER with a fixed search_path: every name in the body is schema-qualified, and
-- pgmq's own functions qualify theirs.
CREATE OR REPLACE FUNCTION pgtasks.ensure_queue(p_queue text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pgtasks.check_queue_name(p_queue);
    IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = p_queue) THEN
        PERFORM pgmq.create(p_queue);
    END IF;
END $$;
REVOKE ALL ON FUNCTION pgtasks.ensure_queue(text) FROM PUBLIC;

-- Grant the group roles their privileges in this database; a no-op while either role is
-- missing. Runs as its owner, so that the default privileges are those of the role that
-- owns the queues. `migrate` calls it whenever the roles lack them (first run, or roles
-- created later); run it by hand after creating the roles, or run `migrate` again.
CREATE FUNCTION pgtasks.grant_roles() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_queue text;
BEGIN
    IF to_regrole('pgtasks_producer') IS NULL OR to_regrole('pgtasks_worker') IS NULL THEN
        RAISE NOTICE 'pgtasks: roles pgtasks_producer and pgtasks_worker do not both exist; '
            'nothing granted';
        RETURN;
    END IF;
    GRANT USAGE ON SCHEMA pgtasks, pgmq TO pgtasks_producer, pgtasks_worker;
    GRANT SELECT ON pgtasks.migrations, pgmq.meta TO pgtasks_producer, pgtasks_worker;
    GRANT EXECUTE ON FUNCTION
        pgtasks.send(text, jsonb, jsonb, double precision, timestamptz),
        pgtasks.send_batch(text, jsonb[], jsonb[], double precision, timestamptz),
        pgtasks.defer(text, text, jsonb, integer),
        pgtasks.ensure_queue(text),
        pgtasks.check_queue_name(text),
        pgtasks.claim_key(text, text),
        pgtasks.message_exists(text, bigint)
        TO pgtasks_producer, pgtasks_worker;
    -- claim_key inserts, locks (SELECT ... FOR UPDATE needs UPDATE) and reclaims keys
    GRANT SELECT, INSERT, UPDATE ON pgtasks.idempotency_keys TO pgtasks_producer;
    GRANT SELECT, INSERT, UPDATE, DELETE
        ON pgtasks.idempotency_keys, pgtasks.dead_letters, pgtasks.attempt_errors
        TO pgtasks_worker;
    FOR v_queue IN SELECT queue_name FROM pgmq.meta LOOP
        EXECUTE format('GRANT SELECT, INSERT ON pgmq.%I TO pgtasks_producer', 'q_' || v_queue);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON pgmq.%I, pgmq.%I '
                       'TO pgtasks_worker', 'q_' || v_queue, 'a_' || v_queue);
    END LOOP;
    -- pgmq.metrics_all() (the status command) reads the queues' msg_id sequences; inserting
    -- needs no privilege on them (identity columns)
    GRANT SELECT ON ALL SEQUENCES IN SCHEMA pgmq TO pgtasks_worker;
    -- queues created from now on (by ensure_queue, as this function's owner)
    ALTER DEFAULT PRIVILEGES IN SCHEMA pgmq
        GRANT SELECT, INSERT ON TABLES TO pgtasks_producer;
    ALTER DEFAULT PRIVILEGES IN SCHEMA pgmq
        GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO pgtasks_worker;
    ALTER DEFAULT PRIVILEGES IN SCHEMA pgmq GRANT SELECT ON SEQUENCES TO pgtasks_worker;
END $$;
REVOKE ALL ON FUNCTION pgtasks.grant_roles() FROM PUBLIC;

-- Enqueue from SQL, refusing at the call what the worker would only move to the dead
-- letters: no task name, or kwargs that are not a JSON object. Same signature as before.
CREATE OR REPLACE FUNCTION pgtasks.defer(
    queue          text,
    task           text,
    kwargs         jsonb DEFAULT '{}',
    delay_seconds  integer DEFAULT 0
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id  bigint;
BEGIN
    IF defer.task IS NULL OR btrim(defer.task) = '' THEN
        RAISE EXCEPTION 'pgtasks.defer: the task name is empty'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'pass the name the task is registered under, '
                         'e.g. ''myproj.tasks.send_welcome_email''';
    END IF;
    IF defer.kwargs IS NOT NULL AND jsonb_typeof(defer.kwargs) <> 'object' THEN
        RAISE EXCEPTION 'pgtasks.defer: kwargs of task % must be a JSON object of named '
            'arguments, not a JSON %', quote_literal(defer.task), jsonb_typeof(defer.kwargs)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'for example ''{"user_id": 42}''::jsonb';
    END IF;
    SELECT s.msg_id INTO v_id FROM pgtasks.send(
        defer.queue,
        jsonb_build_object('v', 1, 'task', defer.task, 'args', '[]'::jsonb,
                           'kwargs', coalesce(defer.kwargs, '{}'::jsonb)),
        NULL,
        defer.delay_seconds
    ) AS s;
    RETURN v_id;
END $$;

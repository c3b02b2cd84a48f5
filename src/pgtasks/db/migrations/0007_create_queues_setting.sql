-- pgtasks 0007: queue creation on enqueue becomes a setting; a deduplicated job says
-- whether its arguments differ from the key holder's.
--
-- Until now pgtasks.send / send_batch created any queue a job was sent to, so a typo in a
-- queue name made a queue that no worker serves, and the job waited there for ever. Whether
-- a missing queue is created on enqueue is now a row of pgtasks.settings, on by default
-- (for development); in production:
--     UPDATE pgtasks.settings SET create_queues = false;
-- A table rather than a GUC (pgtasks.create_queues, read with current_setting): a change
-- applies at once to every session, pooled connections included (ALTER DATABASE ... SET
-- reaches only new sessions), and to PgBouncer in transaction mode alike; it is
-- transactional and visible (SELECT * FROM pgtasks.settings); only its owner, the role that
-- migrates, may change it, where any session may SET a GUC, so a producer cannot turn it
-- back on for itself; it needs no database ownership, and survives a dump and restore. It is
-- read only when a queue is missing: an enqueue to an existing queue pays nothing.
--
-- Python producers pass App(create_queues=...) as a sixth argument: a missing queue is
-- created when neither the app nor the database says no. The five-argument send and
-- send_batch (SQL producers, pgtasks.defer, dead-letter retries, older clients) keep their
-- signatures and follow the database's setting.
--
-- The six-argument functions also return args_differ: for a deduplicated message, whether
-- its body differs from the key holder's (NULL when the holder's body is gone, or for a
-- message that was sent). It is computed only on the deduplicated path. The five-argument
-- ones raise a WARNING instead, which reaches the client and the server log.

CREATE TABLE pgtasks.settings (
    id             boolean PRIMARY KEY DEFAULT true CHECK (id),
    create_queues  boolean NOT NULL DEFAULT true
);
COMMENT ON TABLE pgtasks.settings IS
    'pgtasks settings for this database: one row. create_queues: create a missing queue '
    'when a job is deferred to it (off in production: UPDATE pgtasks.settings SET '
    'create_queues = false)';
INSERT INTO pgtasks.settings DEFAULT VALUES;

-- The queue a job is about to be sent to: nothing to do when it exists; else created (as
-- the owner, through ensure_queue) when neither p_create nor the database's setting is
-- false, else an error (SQLSTATE PGQ01) that says how to create it.
CREATE FUNCTION pgtasks.queue_for_enqueue(p_queue text, p_create boolean) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_off text;
BEGIN
    PERFORM pgtasks.check_queue_name(p_queue);
    IF EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = p_queue) THEN
        RETURN;
    END IF;
    IF p_create IS FALSE THEN
        v_off := 'App(create_queues=False)';
    ELSIF NOT coalesce((SELECT s.create_queues FROM pgtasks.settings AS s), true) THEN
        v_off := 'pgtasks.settings.create_queues';
    END IF;
    IF v_off IS NOT NULL THEN
        RAISE EXCEPTION 'queue % does not exist and queue creation on enqueue is off (%); '
            'create it with `python -m pgtasks migrate --app ...` (the queues of the app''s '
            'tasks) or SELECT pgtasks.ensure_queue(%), or check the queue name',
            quote_literal(p_queue), v_off, quote_literal(p_queue)
            USING ERRCODE = 'PGQ01';
    END IF;
    PERFORM pgtasks.ensure_queue(p_queue);
END $$;
REVOKE ALL ON FUNCTION pgtasks.queue_for_enqueue(text, boolean) FROM PUBLIC;

-- Whether p_message differs from the body of the job that holds p_key: NULL when that body
-- is gone (deleted, or the queue dropped). Looks in the queue and then in its archive (a
-- succeeded job holds its key for key_retention), the message identified as in claim_key
-- (msg_id and enqueue time). Runs as the owner: producers may not read archives, and learn
-- only whether the bodies are equal.
CREATE FUNCTION pgtasks.differs_from_key_holder(p_key text, p_message jsonb) RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r       record;
    v_body  jsonb;
    v_table text;
BEGIN
    SELECT k.queue, k.msg_id, k.created_at INTO r
        FROM pgtasks.idempotency_keys AS k WHERE k.key = p_key;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF r.msg_id IS NULL THEN
        RETURN NULL;
    END IF;
    FOREACH v_table IN ARRAY ARRAY['q_' || r.queue, 'a_' || r.queue] LOOP
        IF to_regclass(format('pgmq.%I', v_table)) IS NOT NULL THEN
            EXECUTE format(
                'SELECT message FROM pgmq.%I WHERE msg_id = $1 AND enqueued_at = $2', v_table)
                INTO v_body USING r.msg_id, r.created_at;
            IF v_body IS NOT NULL THEN
                RETURN v_body IS DISTINCT FROM p_message;
            END IF;
        END IF;
    END LOOP;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION pgtasks.differs_from_key_holder(text, jsonb) FROM PUBLIC;

-- send_batch, with the app's word on queue creation and args_differ (see above).
CREATE FUNCTION pgtasks.send_batch(
    p_queue         text,
    p_messages      jsonb[],
    p_headers       jsonb[],
    p_delay         double precision,
    p_eta           timestamptz,
    p_create_queue  boolean
) RETURNS TABLE (msg_id bigint, deduplicated boolean, queue text, args_differ boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_n       integer := coalesce(array_length(p_messages, 1), 0);
    v_vt      timestamptz;
    v_ids     bigint[] := array_fill(NULL::bigint, ARRAY[v_n]);
    v_dup     boolean[] := array_fill(false, ARRAY[v_n]);
    v_differ  boolean[] := array_fill(NULL::boolean, ARRAY[v_n]);
    v_queues  text[] := array_fill(p_queue, ARRAY[v_n]);
    v_keys    text[] := array_fill(NULL::text, ARRAY[v_n]);
    v_pos     integer[] := '{}';
    v_msgs    jsonb[] := '{}';
    v_hdrs    jsonb[] := '{}';
    v_sent    bigint[];
    v_key     text;
    v_holder  bigint;
BEGIN
    IF v_n = 0 THEN
        RETURN;
    END IF;
    IF p_headers IS NOT NULL AND coalesce(array_length(p_headers, 1), 0) <> v_n THEN
        RAISE EXCEPTION 'pgtasks.send_batch: % messages but % headers', v_n,
            coalesce(array_length(p_headers, 1), 0) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pgtasks.queue_for_enqueue(p_queue, p_create_queue);
    v_vt := coalesce(p_eta, clock_timestamp() + make_interval(secs => coalesce(p_delay, 0)));

    IF p_headers IS NULL OR NOT EXISTS (
        SELECT 1 FROM unnest(p_headers) h WHERE h ? 'idempotency_key'
    ) THEN
        -- The common case: no keys, one INSERT. Identity values grow in input order.
        RETURN QUERY
            SELECT s.id, false, p_queue, NULL::boolean
            FROM pgmq.send_batch(p_queue, p_messages, p_headers, v_vt) AS s(id)
            ORDER BY s.id;
    ELSE
        FOR i IN 1 .. v_n LOOP
            v_key := p_headers[i] ->> 'idempotency_key';
            v_holder := NULL;
            IF v_key IS NOT NULL THEN
                v_holder := pgtasks.claim_key(v_key, p_queue);
                -- the same key twice in one batch: the later one joins the earlier one
                IF v_holder IS NULL AND v_key = ANY (v_keys) THEN
                    v_holder := -array_position(v_keys, v_key);
                END IF;
            END IF;
            IF v_holder IS NULL THEN
                v_keys[i] := v_key;
                v_pos := v_pos || i;
                v_msgs := v_msgs || p_messages[i];
                v_hdrs := v_hdrs || p_headers[i];
            ELSE
                v_ids[i] := v_holder;
                v_dup[i] := true;
                IF v_holder > 0 THEN
                    v_queues[i] := (SELECT k.queue FROM pgtasks.idempotency_keys AS k
                                    WHERE k.key = v_key);
                    v_differ[i] := pgtasks.differs_from_key_holder(v_key, p_messages[i]);
                ELSE
                    v_differ[i] := p_messages[i] IS DISTINCT FROM p_messages[-v_holder];
                END IF;
            END IF;
        END LOOP;
        IF array_length(v_pos, 1) > 0 THEN
            SELECT array_agg(s.id ORDER BY s.id) INTO v_sent
                FROM pgmq.send_batch(p_queue, v_msgs, v_hdrs, v_vt) AS s(id);
            FOR j IN 1 .. array_length(v_pos, 1) LOOP
                v_ids[v_pos[j]] := v_sent[j];
            END LOOP;
            UPDATE pgtasks.idempotency_keys k
                SET msg_id = v_ids[t.i]
                FROM unnest(v_keys) WITH ORDINALITY AS t(key, i)
                WHERE t.key IS NOT NULL AND k.key = t.key;
        END IF;
        FOR i IN 1 .. v_n LOOP
            IF v_ids[i] < 0 THEN
                v_ids[i] := v_ids[-v_ids[i]];
            END IF;
        END LOOP;
        RETURN QUERY SELECT t.id, t.dup, t.q, t.differ
            FROM unnest(v_ids, v_dup, v_queues, v_differ) WITH ORDINALITY AS t(id, dup, q, differ, i)
            ORDER BY t.i;
    END IF;
    PERFORM pg_notify('pgtasks', p_queue);
END $$;

-- send, likewise.
CREATE FUNCTION pgtasks.send(
    p_queue         text,
    p_message       jsonb,
    p_headers       jsonb,
    p_delay         double precision,
    p_eta           timestamptz,
    p_create_queue  boolean
) RETURNS TABLE (msg_id bigint, deduplicated boolean, queue text, args_differ boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_key     text := p_headers ->> 'idempotency_key';
    v_holder  bigint;
    v_id      bigint;
BEGIN
    PERFORM pgtasks.queue_for_enqueue(p_queue, p_create_queue);
    IF v_key IS NOT NULL THEN
        v_holder := pgtasks.claim_key(v_key, p_queue);
        IF v_holder IS NOT NULL THEN
            RETURN QUERY SELECT v_holder, true,
                (SELECT k.queue FROM pgtasks.idempotency_keys AS k WHERE k.key = v_key),
                pgtasks.differs_from_key_holder(v_key, p_message);
            RETURN;
        END IF;
    END IF;
    SELECT s.id INTO v_id FROM pgmq.send(
        p_queue, p_message, p_headers,
        coalesce(p_eta, clock_timestamp() + make_interval(secs => coalesce(p_delay, 0)))
    ) AS s(id);
    IF v_key IS NOT NULL THEN
        UPDATE pgtasks.idempotency_keys SET msg_id = v_id WHERE key = v_key;
    END IF;
    PERFORM pg_notify('pgtasks', p_queue);
    RETURN QUERY SELECT v_id, false, p_queue, NULL::boolean;
END $$;

-- The five-argument functions, same signatures and results as before: the database's
-- setting decides on queue creation, and a deduplicated message whose arguments differ
-- from the key holder's raises a WARNING.
CREATE OR REPLACE FUNCTION pgtasks.send_batch(
    p_queue     text,
    p_messages  jsonb[],
    p_headers   jsonb[] DEFAULT NULL,
    p_delay     double precision DEFAULT 0,
    p_eta       timestamptz DEFAULT NULL
) RETURNS TABLE (msg_id bigint, deduplicated boolean, queue text)
LANGUAGE plpgsql AS $$
DECLARE
    r  record;
    i  integer := 0;
BEGIN
    FOR r IN SELECT * FROM pgtasks.send_batch(
        p_queue, p_messages, p_headers, p_delay, p_eta, NULL::boolean) LOOP
        i := i + 1;
        IF r.args_differ THEN
            RAISE WARNING 'pgtasks: idempotency key % is held by job % (queue %), deferred '
                'with other arguments; this message was deduplicated and its arguments ignored',
                quote_literal(p_headers[i] ->> 'idempotency_key'), r.msg_id, r.queue;
        END IF;
        msg_id := r.msg_id;
        deduplicated := r.deduplicated;
        queue := r.queue;
        RETURN NEXT;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION pgtasks.send(
    p_queue    text,
    p_message  jsonb,
    p_headers  jsonb DEFAULT NULL,
    p_delay    double precision DEFAULT 0,
    p_eta      timestamptz DEFAULT NULL
) RETURNS TABLE (msg_id bigint, deduplicated boolean, queue text)
LANGUAGE plpgsql AS $$
DECLARE
    r  record;
BEGIN
    SELECT * INTO r FROM pgtasks.send(p_queue, p_message, p_headers, p_delay, p_eta, NULL::boolean);
    IF r.args_differ THEN
        RAISE WARNING 'pgtasks: idempotency key % is held by job % (queue %), deferred with '
            'other arguments; this message was deduplicated and its arguments ignored',
            quote_literal(p_headers ->> 'idempotency_key'), r.msg_id, r.queue;
    END IF;
    RETURN QUERY SELECT r.msg_id, r.deduplicated, r.queue;
END $$;

-- grant_roles wraps the one before it (as 0006 does), adding the setting and the new
-- functions, so that the grants of every migration compose.
ALTER FUNCTION pgtasks.grant_roles() RENAME TO grant_roles_before_0007;

CREATE FUNCTION pgtasks.grant_roles() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pgtasks.grant_roles_before_0007();
    IF to_regrole('pgtasks_producer') IS NULL OR to_regrole('pgtasks_worker') IS NULL THEN
        RETURN;
    END IF;
    GRANT SELECT ON pgtasks.settings TO pgtasks_producer, pgtasks_worker;
    GRANT EXECUTE ON FUNCTION
        pgtasks.send(text, jsonb, jsonb, double precision, timestamptz, boolean),
        pgtasks.send_batch(text, jsonb[], jsonb[], double precision, timestamptz, boolean),
        pgtasks.queue_for_enqueue(text, boolean),
        pgtasks.differs_from_key_holder(text, jsonb)
        TO pgtasks_producer, pgtasks_worker;
END $$;
REVOKE ALL ON FUNCTION pgtasks.grant_roles() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgtasks.grant_roles_before_0007() FROM PUBLIC;

-- roles granted before this migration get the new functions now
DO $$
BEGIN
    IF to_regrole('pgtasks_producer') IS NOT NULL AND to_regrole('pgtasks_worker') IS NOT NULL
    THEN
        PERFORM pgtasks.grant_roles();
    END IF;
END $$;

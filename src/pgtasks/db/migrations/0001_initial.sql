-- pgtasks 0001: idempotency keys, dead letters, and the enqueue functions.
--
-- Messages themselves live in pgmq queues. This schema holds only what pgmq lacks. The send
-- functions are the one way pgtasks enqueues: Python calls them, and so can a trigger or
-- another language (pgtasks.defer). Each one checks the queue name, creates the queue on first
-- use (inside the caller's transaction, so a rollback undoes it), honours the idempotency key
-- in the headers, and sends one wake-up NOTIFY on channel 'pgtasks' with the queue name as
-- payload (PostgreSQL folds identical notifications of one transaction into one).

CREATE TABLE pgtasks.idempotency_keys (
    key         text PRIMARY KEY,
    queue       text NOT NULL,
    msg_id      bigint,                 -- NULL only inside the transaction that claims the key
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz             -- NULL while the job waits or runs; set at success
);
CREATE INDEX idempotency_keys_expires_at ON pgtasks.idempotency_keys (expires_at)
    WHERE expires_at IS NOT NULL;

CREATE TABLE pgtasks.dead_letters (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue        text NOT NULL,
    msg_id       bigint NOT NULL,
    task         text,                  -- NULL when the body named none
    message      jsonb,
    headers      jsonb,
    read_ct      integer NOT NULL,
    enqueued_at  timestamptz NOT NULL,
    failed_at    timestamptz NOT NULL DEFAULT now(),
    reason       text NOT NULL,
    error        jsonb                  -- {"type", "message", "traceback"} of the last attempt
);
CREATE INDEX dead_letters_queue_task ON pgtasks.dead_letters (queue, task);
CREATE INDEX dead_letters_failed_at ON pgtasks.dead_letters (failed_at);

-- One row per failed attempt, written only on failure (the success path stays lean), in the
-- same transaction as the retry or the move to the dead letters.
CREATE TABLE pgtasks.attempt_errors (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue       text NOT NULL,
    msg_id      bigint NOT NULL,
    task        text,
    attempt     integer NOT NULL,
    error_type  text NOT NULL,
    message     text NOT NULL,
    traceback   text,
    worker      text NOT NULL,          -- host:pid
    failed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX attempt_errors_message ON pgtasks.attempt_errors (queue, msg_id);
CREATE INDEX attempt_errors_failed_at ON pgtasks.attempt_errors (failed_at);

-- Queue names pgtasks accepts; pgmq accepts more but lowercases table names and not its
-- metadata, which breaks mixed-case names in subtle ways.
CREATE FUNCTION pgtasks.check_queue_name(p_queue text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_queue IS NULL OR p_queue !~ '^[a-z][a-z0-9_]{0,39}$' THEN
        RAISE EXCEPTION 'invalid queue name %: use 1 to 40 characters of a-z, 0-9 and _, '
            'starting with a letter', coalesce(quote_literal(p_queue), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;

CREATE FUNCTION pgtasks.ensure_queue(p_queue text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgtasks.check_queue_name(p_queue);
    IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = p_queue) THEN
        PERFORM pgmq.create(p_queue);
    END IF;
END $$;

CREATE FUNCTION pgtasks.message_exists(p_queue text, p_msg_id bigint) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_found boolean;
BEGIN
    IF to_regclass(format('pgmq.%I', 'q_' || p_queue)) IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgmq.%I WHERE msg_id = $1)', 'q_' || p_queue)
        INTO v_found USING p_msg_id;
    RETURN v_found;
END $$;

-- Claim an idempotency key for a new message. Returns NULL when the caller now owns the key
-- (and must send, then record its msg_id), or the msg_id of the job that already holds it.
-- A key holds while its message waits or runs and, after success, until expires_at. A key
-- whose message is gone without success (deleted by hand, queue dropped) is stale and is
-- reclaimed. Concurrent claims of one key serialize on the primary key: exactly one wins.
CREATE FUNCTION pgtasks.claim_key(p_key text, p_queue text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    r pgtasks.idempotency_keys;
BEGIN
    INSERT INTO pgtasks.idempotency_keys (key, queue) VALUES (p_key, p_queue)
        ON CONFLICT (key) DO NOTHING;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO r FROM pgtasks.idempotency_keys WHERE key = p_key FOR UPDATE;
    IF r.msg_id IS NOT NULL AND (
        (r.expires_at IS NULL AND pgtasks.message_exists(r.queue, r.msg_id))
        OR r.expires_at > now()
    ) THEN
        RETURN r.msg_id;
    END IF;
    UPDATE pgtasks.idempotency_keys
        SET queue = p_queue, msg_id = NULL, created_at = now(), expires_at = NULL
        WHERE key = p_key;
    RETURN NULL;
END $$;

-- Send a batch of messages to one queue, all visible at one time (p_eta, else now + p_delay
-- seconds on the database clock). Returns one row per input message, in input order: the
-- msg_id sent, or, for a message whose idempotency key is taken, the holder's msg_id and
-- queue with deduplicated = true. Keys are read from headers->>'idempotency_key'.
CREATE FUNCTION pgtasks.send_batch(
    p_queue     text,
    p_messages  jsonb[],
    p_headers   jsonb[] DEFAULT NULL,
    p_delay     double precision DEFAULT 0,
    p_eta       timestamptz DEFAULT NULL
) RETURNS TABLE (msg_id bigint, deduplicated boolean, queue text)
LANGUAGE plpgsql AS $$
DECLARE
    v_n       integer := coalesce(array_length(p_messages, 1), 0);
    v_vt      timestamptz;
    v_ids     bigint[] := array_fill(NULL::bigint, ARRAY[v_n]);
    v_dup     boolean[] := array_fill(false, ARRAY[v_n]);
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
    PERFORM pgtasks.ensure_queue(p_queue);
    v_vt := coalesce(p_eta, clock_timestamp() + make_interval(secs => coalesce(p_delay, 0)));

    IF p_headers IS NULL OR NOT EXISTS (
        SELECT 1 FROM unnest(p_headers) h WHERE h ? 'idempotency_key'
    ) THEN
        -- The common case: no keys, one INSERT. Identity values grow in input order.
        RETURN QUERY
            SELECT s.id, false, p_queue
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
        RETURN QUERY SELECT t.id, t.dup, t.q
            FROM unnest(v_ids, v_dup, v_queues) WITH ORDINALITY AS t(id, dup, q, i)
            ORDER BY t.i;
    END IF;
    PERFORM pg_notify('pgtasks', p_queue);
END $$;

-- Send one message. Same contract as send_batch, for the common single case.
CREATE FUNCTION pgtasks.send(
    p_queue    text,
    p_message  jsonb,
    p_headers  jsonb DEFAULT NULL,
    p_delay    double precision DEFAULT 0,
    p_eta      timestamptz DEFAULT NULL
) RETURNS TABLE (msg_id bigint, deduplicated boolean, queue text)
LANGUAGE plpgsql AS $$
DECLARE
    v_key     text := p_headers ->> 'idempotency_key';
    v_holder  bigint;
    v_id      bigint;
BEGIN
    PERFORM pgtasks.ensure_queue(p_queue);
    IF v_key IS NOT NULL THEN
        v_holder := pgtasks.claim_key(v_key, p_queue);
        IF v_holder IS NOT NULL THEN
            RETURN QUERY SELECT v_holder, true,
                (SELECT k.queue FROM pgtasks.idempotency_keys AS k WHERE k.key = v_key);
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
    RETURN QUERY SELECT v_id, false, p_queue;
END $$;

-- Enqueue a pgtasks job from SQL (a trigger, the outbox case, another language):
--   SELECT pgtasks.defer('email', 'myproj.tasks.send_welcome_email', '{"user_id": 42}');
CREATE FUNCTION pgtasks.defer(
    queue          text,
    task           text,
    kwargs         jsonb DEFAULT '{}',
    delay_seconds  integer DEFAULT 0
) RETURNS bigint
LANGUAGE sql AS $$
    SELECT s.msg_id FROM pgtasks.send(
        queue,
        jsonb_build_object('v', 1, 'task', task, 'args', '[]'::jsonb,
                           'kwargs', coalesce(kwargs, '{}'::jsonb)),
        NULL,
        delay_seconds
    ) AS s;
$$;

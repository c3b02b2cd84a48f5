-- pgtasks 0004: what a job became (results, cancellations, expiries), cancel requests, and
-- the status of a job in one call.
--
-- A job's terminal record is wherever the job ended: the queue's archive after success, the
-- dead letters after a failure, and, new here, pgtasks.job_results for a job that succeeded
-- with a result to keep, was cancelled, or expired before it started. Each is written in the
-- statement (or transaction) that removes the job from its queue, so a job is never in two
-- places and never in none.

CREATE TABLE pgtasks.job_results (
    queue        text NOT NULL,
    msg_id       bigint NOT NULL,
    enqueued_at  timestamptz NOT NULL,   -- with msg_id, which message (a queue made again restarts ids)
    state        text NOT NULL CHECK (state IN ('succeeded', 'cancelled', 'expired')),
    task         text,
    result       jsonb,                  -- succeeded: the return value kept (NULL: none)
    error        jsonb,                  -- a result that could not be kept, or why it ended
    finished_at  timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,            -- prune deletes the record after this
    PRIMARY KEY (queue, msg_id)
);
CREATE INDEX job_results_expires_at ON pgtasks.job_results (expires_at)
    WHERE expires_at IS NOT NULL;

-- A request to cancel a job that was running when it came; the worker running it hears of
-- it (NOTIFY on channel pgtasks_cancel, and on its next lease extension) and cancels the run.
CREATE TABLE pgtasks.cancel_requests (
    queue         text NOT NULL,
    msg_id        bigint NOT NULL,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, msg_id)
);

CREATE INDEX dead_letters_queue_msg_id ON pgtasks.dead_letters (queue, msg_id);
CREATE INDEX attempt_errors_attempt ON pgtasks.attempt_errors (queue, msg_id, attempt);

-- The attempts a message has used: claims made less those given back at worker stops (the
-- header's count is trusted only below read_ct, as the worker does).
CREATE FUNCTION pgtasks.attempts_of(p_read_ct integer, p_headers jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT p_read_ct - CASE
        WHEN jsonb_typeof(p_headers) = 'object'
             AND (p_headers ->> 'x-pgtasks-released') ~ '^[0-9]{1,9}$'
             AND (p_headers ->> 'x-pgtasks-released')::bigint < p_read_ct
        THEN (p_headers ->> 'x-pgtasks-released')::integer ELSE 0 END
$$;

-- Where each of these jobs is, and what it became:
--   scheduled  in its queue, not yet visible, never claimed (a delay or an eta)
--   waiting    in its queue, visible (or its lease ran out), no failed attempt pending
--   running    claimed: its lease runs, and its current attempt has not failed
--   retrying   waiting for its next attempt after a failed one
--   succeeded  acked (archived, or its result kept), failed (in the dead letters),
--   cancelled, expired, or unknown (never existed, or pruned).
-- STABLE: one snapshot for all the lookups, so a job acked meanwhile is not missed.
CREATE FUNCTION pgtasks.job_info(p_queue text, p_ids bigint[])
RETURNS TABLE (
    msg_id bigint, state text, task text, attempts integer, enqueued_at timestamptz,
    finished_at timestamptz, result jsonb, error jsonb, cancel_requested boolean
)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pgtasks.check_queue_name(p_queue);
    IF to_regclass(format('pgmq.%I', 'q_' || p_queue)) IS NULL THEN
        RETURN QUERY
            SELECT i.id, coalesce(r.state, CASE WHEN d.msg_id IS NOT NULL THEN 'failed' END,
                                  'unknown'),
                   coalesce(r.task, d.task), d.read_ct, coalesce(r.enqueued_at, d.enqueued_at),
                   coalesce(r.finished_at, d.failed_at), r.result,
                   coalesce(r.error, CASE WHEN d.msg_id IS NOT NULL THEN
                   coalesce(d.error, '{}') || jsonb_build_object('reason', d.reason) END), false
            FROM unnest(p_ids) AS i(id)
            LEFT JOIN pgtasks.job_results AS r ON r.queue = p_queue AND r.msg_id = i.id
            LEFT JOIN LATERAL (
                SELECT * FROM pgtasks.dead_letters AS x
                WHERE x.queue = p_queue AND x.msg_id = i.id ORDER BY x.id DESC LIMIT 1
            ) AS d ON true;
        RETURN;
    END IF;
    RETURN QUERY EXECUTE format($q$
        SELECT i.id,
               CASE
                   WHEN r.state IS NOT NULL THEN r.state
                   WHEN q.msg_id IS NOT NULL THEN
                       CASE
                           WHEN q.attempts > 0 AND EXISTS (
                               SELECT 1 FROM pgtasks.attempt_errors AS e
                               WHERE e.queue = $1 AND e.msg_id = q.msg_id
                                 AND e.attempt = q.attempts) THEN 'retrying'
                           WHEN q.vt > clock_timestamp() AND q.attempts = 0 THEN 'scheduled'
                           WHEN q.vt > clock_timestamp() THEN 'running'
                           ELSE 'waiting'
                       END
                   WHEN a.msg_id IS NOT NULL THEN 'succeeded'
                   WHEN d.msg_id IS NOT NULL THEN 'failed'
                   ELSE 'unknown'
               END,
               coalesce(r.task, q.message ->> 'task', a.message ->> 'task', d.task),
               coalesce(q.attempts, pgtasks.attempts_of(a.read_ct, a.headers), d.read_ct),
               coalesce(r.enqueued_at, q.enqueued_at, a.enqueued_at, d.enqueued_at),
               coalesce(r.finished_at, a.archived_at, d.failed_at),
               r.result,
               coalesce(r.error, CASE WHEN d.msg_id IS NOT NULL THEN
                   coalesce(d.error, '{}') || jsonb_build_object('reason', d.reason) END),
               EXISTS (SELECT 1 FROM pgtasks.cancel_requests AS c
                       WHERE c.queue = $1 AND c.msg_id = i.id)
        FROM unnest($2) AS i(id)
        LEFT JOIN pgtasks.job_results AS r ON r.queue = $1 AND r.msg_id = i.id
        LEFT JOIN LATERAL (
            SELECT m.msg_id, m.vt, m.enqueued_at, m.message,
                   pgtasks.attempts_of(m.read_ct, m.headers) AS attempts
            FROM pgmq.%1$I AS m WHERE m.msg_id = i.id
        ) AS q ON r.state IS NULL
        LEFT JOIN pgmq.%2$I AS a ON q.msg_id IS NULL AND a.msg_id = i.id
        LEFT JOIN LATERAL (
            SELECT * FROM pgtasks.dead_letters AS x
            WHERE x.queue = $1 AND x.msg_id = i.id ORDER BY x.id DESC LIMIT 1
        ) AS d ON r.state IS NULL AND q.msg_id IS NULL AND a.msg_id IS NULL
    $q$, 'q_' || p_queue, 'a_' || p_queue) USING p_queue, p_ids;
END $$;

-- Cancel jobs: one that is not running (scheduled, waiting, retrying) is removed from its
-- queue and recorded as cancelled, its idempotency key released, in this statement; for one
-- that runs, a request is recorded and the worker running it is told (NOTIFY
-- pgtasks_cancel, payload 'queue:id'). Returns, per id: cancelled, requested, finished
-- (it had ended already: nothing to do) or unknown.
-- SECURITY DEFINER (fixed search_path, qualified names): a producer may cancel its jobs
-- without holding privileges on the queue tables themselves.
CREATE FUNCTION pgtasks.cancel(p_queue text, p_ids bigint[], p_ttl double precision DEFAULT 604800)
RETURNS TABLE (msg_id bigint, outcome text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_id       bigint;
    v_row      record;
    v_found    boolean;
    v_count    bigint;
    v_running  boolean;
    v_ended    boolean;
    v_exists   boolean;
BEGIN
    PERFORM pgtasks.check_queue_name(p_queue);
    v_exists := to_regclass(format('pgmq.%I', 'q_' || p_queue)) IS NOT NULL;
    FOREACH v_id IN ARRAY p_ids LOOP
        v_found := false;
        IF v_exists THEN
            -- the row lock waits for a claim in progress, and keeps a claim off meanwhile
            EXECUTE format('SELECT msg_id, vt, enqueued_at, message, headers, '
                           'pgtasks.attempts_of(read_ct, headers) AS attempts '
                           'FROM pgmq.%I WHERE msg_id = $1 FOR UPDATE', 'q_' || p_queue)
                INTO v_row USING v_id;
            GET DIAGNOSTICS v_count = ROW_COUNT;  -- (EXECUTE does not set FOUND)
            v_found := v_count > 0;
        END IF;
        IF NOT v_found THEN
            SELECT state NOT IN ('unknown') INTO v_ended
                FROM pgtasks.job_info(p_queue, ARRAY[v_id]);
            msg_id := v_id;
            outcome := CASE WHEN v_ended THEN 'finished' ELSE 'unknown' END;
            RETURN NEXT;
            CONTINUE;
        END IF;
        v_running := v_row.vt > clock_timestamp() AND v_row.attempts > 0 AND NOT EXISTS (
            SELECT 1 FROM pgtasks.attempt_errors AS e
            WHERE e.queue = p_queue AND e.msg_id = v_id AND e.attempt = v_row.attempts);
        IF v_running THEN
            INSERT INTO pgtasks.cancel_requests (queue, msg_id) VALUES (p_queue, v_id)
                ON CONFLICT DO NOTHING;
            PERFORM pg_notify('pgtasks_cancel', p_queue || ':' || v_id);
            msg_id := v_id;
            outcome := 'requested';
            RETURN NEXT;
            CONTINUE;
        END IF;
        EXECUTE format('DELETE FROM pgmq.%I WHERE msg_id = $1', 'q_' || p_queue) USING v_id;
        DELETE FROM pgtasks.idempotency_keys AS k
            WHERE k.key = v_row.headers ->> 'idempotency_key' AND k.msg_id = v_id
              AND k.queue = p_queue;
        INSERT INTO pgtasks.job_results AS r
            (queue, msg_id, enqueued_at, state, task, error, expires_at)
            VALUES (p_queue, v_id, v_row.enqueued_at, 'cancelled', v_row.message ->> 'task',
                    jsonb_build_object('reason', 'cancelled before it ran'),
                    now() + make_interval(secs => p_ttl))
            ON CONFLICT (queue, msg_id) DO UPDATE SET
                enqueued_at = EXCLUDED.enqueued_at, state = EXCLUDED.state,
                task = EXCLUDED.task, result = NULL, error = EXCLUDED.error,
                finished_at = now(), expires_at = EXCLUDED.expires_at;
        PERFORM pg_notify('pgtasks_done', p_queue);
        msg_id := v_id;
        outcome := 'cancelled';
        RETURN NEXT;
    END LOOP;
END $$;

REVOKE ALL ON FUNCTION pgtasks.job_info(text, bigint[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgtasks.cancel(text, bigint[], double precision) FROM PUBLIC;

-- Grants for the group roles: both sides read what jobs became and cancel them (through the
-- functions above); the worker writes results and reads and clears cancel requests.
CREATE FUNCTION pgtasks.grant_job_results() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF to_regrole('pgtasks_producer') IS NULL OR to_regrole('pgtasks_worker') IS NULL THEN
        RETURN;
    END IF;
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgtasks.job_results, pgtasks.cancel_requests
        TO pgtasks_worker;
    GRANT EXECUTE ON FUNCTION
        pgtasks.attempts_of(integer, jsonb),
        pgtasks.job_info(text, bigint[]),
        pgtasks.cancel(text, bigint[], double precision)
        TO pgtasks_producer, pgtasks_worker;
END $$;
REVOKE ALL ON FUNCTION pgtasks.grant_job_results() FROM PUBLIC;
SELECT pgtasks.grant_job_results();

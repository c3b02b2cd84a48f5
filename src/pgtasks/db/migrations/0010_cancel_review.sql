-- pgtasks 0010: a job's records answer only for that job, and cancels never deadlock.
--
-- pgmq's message ids start again when a queue is dropped and created again, and pgtasks'
-- own tables (records, cancel requests, dead letters, attempt errors) outlive the queue.
-- So a record matched by (queue, msg_id) alone could answer for a newer job with the same
-- id: a new job read as "cancelled", or cancelled by an old request. Each record now
-- answers only for the job it belongs to, told by the message's enqueued_at:
--
-- * pgtasks.cancel_requests stores the enqueued_at of the job it asks to cancel (rows from
--   before this migration have none, and keep matching by id as before);
-- * job_info takes the newest job of an id (the one in the queue or its archive, else the
--   newest record or dead letter), and uses only the records with its enqueued_at; an
--   attempt error counts only if it was recorded after the job was enqueued;
-- * cancel locks its jobs in id order, so that two cancels of overlapping sets of jobs
--   wait for each other instead of deadlocking.

ALTER TABLE pgtasks.cancel_requests ADD COLUMN enqueued_at timestamptz;

-- Whether a request to cancel this job (this message, not an older one with its id) exists.
CREATE FUNCTION pgtasks.cancel_requested(p_queue text, p_msg_id bigint, p_enqueued_at timestamptz)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM pgtasks.cancel_requests AS c
        WHERE c.queue = p_queue AND c.msg_id = p_msg_id
          AND (c.enqueued_at IS NULL OR c.enqueued_at = p_enqueued_at))
$$;

CREATE OR REPLACE FUNCTION pgtasks.job_info(p_queue text, p_ids bigint[])
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
            LEFT JOIN pgtasks.job_results AS r0 ON r0.queue = p_queue AND r0.msg_id = i.id
            LEFT JOIN LATERAL (
                SELECT * FROM pgtasks.dead_letters AS x
                WHERE x.queue = p_queue AND x.msg_id = i.id ORDER BY x.id DESC LIMIT 1
            ) AS d0 ON true
            -- the newest job of this id: the record and the dead letter answer only for it
            CROSS JOIN LATERAL (
                SELECT greatest(r0.enqueued_at, d0.enqueued_at) AS enq
            ) AS w
            LEFT JOIN pgtasks.job_results AS r
                ON r.queue = r0.queue AND r.msg_id = r0.msg_id AND r0.enqueued_at = w.enq
            LEFT JOIN pgtasks.dead_letters AS d ON d.id = d0.id AND d0.enqueued_at = w.enq;
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
                                 AND e.attempt = q.attempts
                                 AND e.failed_at >= q.enqueued_at) THEN 'retrying'
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
               q.msg_id IS NOT NULL AND pgtasks.cancel_requested($1, i.id, q.enqueued_at)
        FROM unnest($2) AS i(id)
        LEFT JOIN LATERAL (
            SELECT m.msg_id, m.vt, m.enqueued_at, m.message,
                   pgtasks.attempts_of(m.read_ct, m.headers) AS attempts
            FROM pgmq.%1$I AS m WHERE m.msg_id = i.id
        ) AS q ON true
        LEFT JOIN pgmq.%2$I AS a ON q.msg_id IS NULL AND a.msg_id = i.id
        LEFT JOIN pgtasks.job_results AS r0 ON r0.queue = $1 AND r0.msg_id = i.id
        LEFT JOIN LATERAL (
            SELECT * FROM pgtasks.dead_letters AS x
            WHERE x.queue = $1 AND x.msg_id = i.id ORDER BY x.id DESC LIMIT 1
        ) AS d0 ON q.msg_id IS NULL AND a.msg_id IS NULL
        -- the newest job of this id: the one in the queue or its archive (a job of an older
        -- queue of this name has its ids taken again), else the newest record or dead
        -- letter; the record and the dead letter answer only for it
        CROSS JOIN LATERAL (
            SELECT coalesce(q.enqueued_at, a.enqueued_at,
                            greatest(r0.enqueued_at, d0.enqueued_at)) AS enq
        ) AS w
        LEFT JOIN pgtasks.job_results AS r
            ON r.queue = r0.queue AND r.msg_id = r0.msg_id AND r0.enqueued_at = w.enq
        LEFT JOIN pgtasks.dead_letters AS d
            ON d.id = d0.id AND d0.enqueued_at = w.enq AND r.state IS NULL
    $q$, 'q_' || p_queue, 'a_' || p_queue) USING p_queue, p_ids;
END $$;

-- The cancel itself: since 0009, pgtasks.cancel wraps the function renamed
-- cancel_before_0009 (and ends a workflow step it cancelled), so that one is replaced.
CREATE OR REPLACE FUNCTION pgtasks.cancel_before_0009(
    p_queue text, p_ids bigint[], p_ttl double precision DEFAULT 604800
)
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
    -- in id order, each once: two cancels of overlapping sets take their row locks in the
    -- same order, so one waits for the other instead of deadlocking
    FOREACH v_id IN ARRAY ARRAY(SELECT DISTINCT x FROM unnest(p_ids) AS u(x)
                                WHERE x IS NOT NULL ORDER BY x) LOOP
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
            WHERE e.queue = p_queue AND e.msg_id = v_id AND e.attempt = v_row.attempts
              AND e.failed_at >= v_row.enqueued_at);
        IF v_running THEN
            -- the request names this job; one left by an older job of this id is replaced
            INSERT INTO pgtasks.cancel_requests AS c (queue, msg_id, enqueued_at)
                VALUES (p_queue, v_id, v_row.enqueued_at)
                ON CONFLICT (queue, msg_id) DO UPDATE
                    SET enqueued_at = EXCLUDED.enqueued_at, requested_at = now()
                    WHERE c.enqueued_at IS DISTINCT FROM EXCLUDED.enqueued_at;
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
        DELETE FROM pgtasks.cancel_requests AS c WHERE c.queue = p_queue AND c.msg_id = v_id;
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

REVOKE ALL ON FUNCTION pgtasks.cancel_requested(text, bigint, timestamptz) FROM PUBLIC;

-- The worker's claim and lease extensions ask cancel_requested; grant_roles composes as
-- described in docs/design.md (it calls the one before it).
ALTER FUNCTION pgtasks.grant_roles() RENAME TO grant_roles_before_0010;
CREATE FUNCTION pgtasks.grant_roles() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pgtasks.grant_roles_before_0010();
    IF to_regrole('pgtasks_producer') IS NULL OR to_regrole('pgtasks_worker') IS NULL THEN
        RETURN;
    END IF;
    GRANT EXECUTE ON FUNCTION pgtasks.cancel_requested(text, bigint, timestamptz)
        TO pgtasks_worker;
END $$;
REVOKE ALL ON FUNCTION pgtasks.grant_roles() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgtasks.grant_roles_before_0010() FROM PUBLIC;
SELECT pgtasks.grant_roles();

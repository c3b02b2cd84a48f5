-- pgtasks 0006: workers you can see, and the state of every queue in one query.
--
-- pgtasks.workers: one row per worker process run, written by the worker itself (an upsert
-- when it starts and every few seconds after, one small write per worker, never per job;
-- stopped_at when it stops cleanly). A worker whose last_seen is older than three heartbeat
-- intervals is gone (crashed, killed, cut off); `prune` deletes old rows. The table stays
-- tiny, has no index but its key (so a heartbeat is a HOT update), and leaves room on each
-- page for those updates.
--
-- pgtasks.queue_status(cap): per queue, what `pgtasks status`, the metrics and the dashboard
-- show, in one call. Every count walks an index and stops after `cap` rows; beyond the cap a
-- number is either estimated (named in `estimated`) or a lower bound (named in `at_least`).
-- See docs/operations.md ("Status") for the definitions.

CREATE TABLE pgtasks.workers (
    id                  uuid PRIMARY KEY,
    host                text NOT NULL,
    pid                 integer NOT NULL,
    queues              text[] NOT NULL,
    concurrency         integer NOT NULL,
    running             integer NOT NULL DEFAULT 0,
    version             text NOT NULL,
    heartbeat_interval  double precision NOT NULL,
    stats               jsonb NOT NULL DEFAULT '{}',  -- jobs by outcome since it started
    started_at          timestamptz NOT NULL DEFAULT now(),
    last_seen           timestamptz NOT NULL DEFAULT now(),
    stopped_at          timestamptz                   -- set when it stopped cleanly
) WITH (fillfactor = 50);

-- The worker role writes its own row and reads the others (status, dashboard). Granted now
-- when the role exists, and by grant_roles() from now on, which wraps the one before it (so
-- that the grants of other migrations compose, whatever their order).
DO $$
BEGIN
    IF to_regrole('pgtasks_worker') IS NOT NULL THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON pgtasks.workers TO pgtasks_worker;
    END IF;
END $$;

ALTER FUNCTION pgtasks.grant_roles() RENAME TO grant_roles_before_0006;

CREATE FUNCTION pgtasks.grant_roles() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pgtasks.grant_roles_before_0006();
    PERFORM pgtasks.grant_job_results();  -- 0004's and 0005's grants, for roles made since
    PERFORM pgtasks.grant_workflows();
    IF to_regrole('pgtasks_producer') IS NULL OR to_regrole('pgtasks_worker') IS NULL THEN
        RETURN;
    END IF;
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgtasks.workers TO pgtasks_worker;
END $$;
REVOKE ALL ON FUNCTION pgtasks.grant_roles() FROM PUBLIC;

-- The attempt a message is on: read_ct less the attempts worker stops gave back (the
-- x-pgtasks-released header, trusted only below read_ct; see db/jobs.py `_released`).
CREATE FUNCTION pgtasks.current_attempt(p_read_ct integer, p_headers jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_read_ct - CASE
        WHEN (p_headers ->> 'x-pgtasks-released') ~ '^[0-9]{1,9}$'
             AND (p_headers ->> 'x-pgtasks-released')::bigint < p_read_ct
        THEN (p_headers ->> 'x-pgtasks-released')::integer ELSE 0 END
$$;

-- Per queue (every pgmq queue whose name pgtasks accepts):
--   waiting    visible now (vt <= now): new, due, retried after their backoff, released, or
--              whose lease ran out; none of them held by a worker
--   scheduled  not visible yet and never claimed (read_ct = 0): deferred with a delay or eta
--   retrying   not visible yet, claimed before, and the attempt it is on failed (its
--              attempt_errors row exists): waiting out its backoff
--   running    not visible yet, claimed, and the attempt it is on has not failed: held by a
--              worker under its lease
--   oldest_waiting_s  how long the first waiting job in line has been due (now - its vt)
--   done_*     archived (succeeded with on_success="archive") in the last minute / hour
--   failed_*   failed attempts (pgtasks.attempt_errors) plus jobs dead-lettered without a
--              recorded error (a body over the size limit, too many attempts), last min / hour
--   dead_letters  in pgtasks.dead_letters now
-- Counts stop after p_cap rows. Beyond it: waiting (or scheduled) is estimated from the
-- table's size (pg_class.reltuples per page times its pages now) less the other states, when
-- those were counted in full and the table has statistics; a window count is extrapolated
-- from the time its newest p_cap rows span. Those fields are named in `estimated`; a count
-- that could be neither is the cap, named in `at_least`.
CREATE FUNCTION pgtasks.queue_status(p_cap integer DEFAULT 50000)
RETURNS TABLE (
    queue             text,
    waiting           bigint,
    scheduled         bigint,
    running           bigint,
    retrying          bigint,
    dead_letters      bigint,
    oldest_waiting_s  double precision,
    done_1m           bigint,
    done_1h           bigint,
    failed_1m         bigint,
    failed_1h         bigint,
    estimated         text[],
    at_least          text[]
)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_now       timestamptz := clock_timestamp();
    v_cap       integer := greatest(coalesce(p_cap, 50000), 1);
    v_q         text;
    v_visible   bigint;
    v_oldest    timestamptz;
    v_hidden    bigint;
    v_sched     bigint;
    v_run       bigint;
    v_retry     bigint;
    v_total     double precision;
    v_first     timestamptz;
    v_n1h       bigint;
    v_n1m       bigint;
    v_failed    jsonb;
    v_ffirst    timestamptz;
    v_fspan     double precision;
    v_dspan     double precision;
BEGIN
    -- failed attempts of every queue at once, newest first, at most p_cap of them
    SELECT coalesce(jsonb_object_agg(f.queue, jsonb_build_array(f.n1m, f.n1h)), '{}'),
           min(f.first), coalesce(sum(f.n1h), 0)
      INTO v_failed, v_ffirst, v_n1h
      FROM (SELECT e.queue, count(*) FILTER (WHERE e.at > v_now - interval '1 minute') AS n1m,
                   count(*) AS n1h, min(e.at) AS first
              FROM (SELECT a.queue, a.failed_at AS at FROM pgtasks.attempt_errors AS a
                     WHERE a.failed_at > v_now - interval '1 hour'
                    UNION ALL
                    SELECT d.queue, d.failed_at FROM pgtasks.dead_letters AS d
                     WHERE d.failed_at > v_now - interval '1 hour' AND d.error IS NULL
                    ORDER BY at DESC LIMIT v_cap + 1) AS e
             GROUP BY e.queue) AS f;
    -- over the cap: each queue's share, extrapolated to the hour from the time it spans
    v_fspan := CASE WHEN v_n1h > v_cap
                    THEN greatest(extract(epoch FROM v_now - v_ffirst), 0.001) END;

    FOR v_q IN SELECT m.queue_name FROM pgmq.meta AS m
               WHERE m.queue_name ~ '^[a-z][a-z0-9_]{0,39}$' ORDER BY m.queue_name LOOP
        BEGIN
            queue := v_q;
            estimated := '{}';
            at_least := '{}';

            EXECUTE format(
                'SELECT count(*), min(vt) FROM (SELECT vt FROM pgmq.%I WHERE vt <= $1 '
                'ORDER BY vt LIMIT $2) AS s', 'q_' || v_q)
                INTO v_visible, v_oldest USING v_now, v_cap + 1;
            EXECUTE format(
                'SELECT count(*), count(*) FILTER (WHERE s.read_ct = 0), '
                '       count(*) FILTER (WHERE s.read_ct > 0 AND NOT s.failed), '
                '       count(*) FILTER (WHERE s.read_ct > 0 AND s.failed) '
                'FROM (SELECT m.read_ct, m.read_ct > 0 AND EXISTS ('
                '          SELECT 1 FROM pgtasks.attempt_errors AS e '
                '          WHERE e.queue = $3 AND e.msg_id = m.msg_id '
                '            AND e.attempt = pgtasks.current_attempt(m.read_ct, m.headers) '
                '            AND e.failed_at >= m.enqueued_at) AS failed '
                '      FROM pgmq.%I AS m WHERE m.vt > $1 ORDER BY m.vt LIMIT $2) AS s',
                'q_' || v_q)
                INTO v_hidden, v_sched, v_run, v_retry USING v_now, v_cap + 1, v_q;
            SELECT CASE WHEN c.relpages > 0 AND c.reltuples >= 0
                        THEN c.reltuples / c.relpages
                             * (pg_relation_size(c.oid) / current_setting('block_size')::bigint)
                   END
              INTO v_total
              FROM pg_class AS c WHERE c.oid = format('pgmq.%I', 'q_' || v_q)::regclass;

            waiting := v_visible;
            scheduled := v_sched;
            running := v_run;
            retrying := v_retry;
            IF v_visible > v_cap THEN
                IF v_hidden <= v_cap AND v_total IS NOT NULL THEN
                    waiting := greatest(v_cap + 1, round(v_total)::bigint - v_hidden);
                    estimated := estimated || 'waiting'::text;
                ELSE
                    waiting := v_cap;
                    at_least := at_least || 'waiting'::text;
                END IF;
            END IF;
            IF v_hidden > v_cap THEN
                -- the first p_cap in vt order hold the running and retrying jobs (leases and
                -- backoffs end soonest); the rest are scheduled
                IF v_visible <= v_cap AND v_total IS NOT NULL THEN
                    scheduled := greatest(v_sched,
                                          round(v_total)::bigint - v_visible - v_run - v_retry);
                    estimated := estimated || 'scheduled'::text;
                ELSE
                    scheduled := least(v_sched, v_cap);
                    at_least := at_least || 'scheduled'::text;
                END IF;
            END IF;
            oldest_waiting_s := extract(epoch FROM v_now - v_oldest);

            EXECUTE format(
                'SELECT count(*) FILTER (WHERE at > $1 - interval ''1 minute''), count(*), '
                '       min(at) '
                'FROM (SELECT archived_at AS at FROM pgmq.%I '
                '      WHERE archived_at > $1 - interval ''1 hour'' '
                '      ORDER BY archived_at DESC LIMIT $2) AS s', 'a_' || v_q)
                INTO v_n1m, v_n1h, v_first USING v_now, v_cap + 1;
            done_1m := v_n1m;
            done_1h := v_n1h;
            IF v_n1h > v_cap THEN  -- the newest p_cap + 1 span less than the hour
                v_dspan := greatest(extract(epoch FROM v_now - v_first), 0.001);
                done_1h := round(v_n1h * 3600 / v_dspan)::bigint;
                estimated := estimated || 'done_1h'::text;
                IF v_first > v_now - interval '1 minute' THEN
                    done_1m := round(v_n1h * 60 / v_dspan)::bigint;
                    estimated := estimated || 'done_1m'::text;
                END IF;
            END IF;

            failed_1m := coalesce((v_failed -> v_q ->> 0)::bigint, 0);
            failed_1h := coalesce((v_failed -> v_q ->> 1)::bigint, 0);
            IF v_fspan IS NOT NULL AND failed_1h > 0 THEN
                failed_1h := round(failed_1h * 3600 / v_fspan)::bigint;
                estimated := estimated || 'failed_1h'::text;
                IF v_ffirst > v_now - interval '1 minute' THEN
                    failed_1m := round(failed_1m * 60 / v_fspan)::bigint;
                    estimated := estimated || 'failed_1m'::text;
                END IF;
            END IF;

            SELECT count(*) INTO dead_letters
              FROM (SELECT 1 FROM pgtasks.dead_letters AS d WHERE d.queue = v_q
                    LIMIT v_cap + 1) AS s;
            IF dead_letters > v_cap THEN
                dead_letters := v_cap;
                at_least := at_least || 'dead_letters'::text;
            END IF;
            RETURN NEXT;
        EXCEPTION WHEN undefined_table THEN
            CONTINUE;  -- dropped while we looked
        END;
    END LOOP;
END $$;

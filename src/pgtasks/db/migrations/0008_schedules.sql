-- pgtasks 0008: periodic jobs.
--
-- One row per schedule, written by the schedulers that define it (every worker runs one)
-- and by the operator (pause, resume, trigger). Exactly one job per tick, without a leader:
-- schedule_fire locks the schedule's row, enqueues only the ticks after its watermark, each
-- under an idempotency key made of the schedule's name and the tick's instant, and moves the
-- watermark forward, in one transaction. Two schedulers that race for a tick serialize on
-- the row: the second finds the watermark past the tick and sends nothing. Ticks are
-- computed by the scheduler from the database's clock, and a tick later than
-- clock_timestamp() is refused here, so a host whose clock is off cannot enqueue early.

CREATE TABLE pgtasks.schedules (
    name              text PRIMARY KEY,
    task              text NOT NULL,
    queue             text NOT NULL,
    kind              text NOT NULL CHECK (kind IN ('cron', 'every')),
    expression        text NOT NULL,          -- '*/5 * * * *', or 'every 5m'
    timezone          text NOT NULL DEFAULT 'UTC',
    catch_up          text NOT NULL,          -- 'none', 'latest', or at most N ticks
    message           jsonb NOT NULL,         -- the envelope every tick sends
    headers           jsonb,                  -- the schedule's own headers, besides pgtasks'
    fingerprint       text NOT NULL,          -- of the definition, as its code has it
    -- ticks at or before the watermark are done with: enqueued, skipped by the catch-up
    -- policy, or earlier than the schedule itself (its creation, its last resume)
    watermark         timestamptz NOT NULL DEFAULT now(),
    next_tick         timestamptz,            -- as computed at the last pass, for listings
    last_tick         timestamptz,            -- the latest tick enqueued
    last_msg_id       bigint,                 -- the job of the last tick or trigger
    last_queue        text,
    last_key          text,                   -- its idempotency key
    paused_at         timestamptz,
    orphaned_at       timestamptz,            -- no running scheduler has defined it lately
    seen_at           timestamptz NOT NULL DEFAULT now(),  -- a scheduler defined it then
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()   -- its definition last changed
);

-- The idempotency key of a tick: the schedule's name and the tick's instant in UTC, to the
-- microsecond.
CREATE FUNCTION pgtasks.schedule_key(p_name text, p_tick timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT 'pgtasks:schedule:' || p_name || ':'
        || to_char(p_tick AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"');
$$;

-- Send one job per tick for schedule r (one send_batch: its keys, the queue's creation, one
-- wake-up), and record the last one as the schedule's last job. Every job carries its tick
-- in the header x-pgtasks-scheduled-at (ISO 8601, UTC), which the worker hands to the job as
-- current_job().scheduled_at, and the schedule's name in x-pgtasks-schedule.
CREATE FUNCTION pgtasks.schedule_send(r pgtasks.schedules, p_ticks timestamptz[])
RETURNS TABLE (tick timestamptz, msg_id bigint, deduplicated boolean, queue text)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    WITH t AS (
        SELECT u.tick AS t, u.i FROM unnest(p_ticks) WITH ORDINALITY AS u(tick, i)
    ), sent AS (
        SELECT s.msg_id, s.deduplicated, s.queue, row_number() OVER () AS i
        FROM pgtasks.send_batch(
            r.queue,
            (SELECT array_agg(r.message ORDER BY t.i) FROM t),
            (SELECT array_agg(
                 coalesce(r.headers, '{}'::jsonb) || jsonb_build_object(
                     'idempotency_key', pgtasks.schedule_key(r.name, t.t),
                     'x-pgtasks-schedule', r.name,
                     'x-pgtasks-scheduled-at',
                     to_char(t.t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00:00')
                 ORDER BY t.i) FROM t)
        ) AS s
    )
    SELECT t.t, sent.msg_id, sent.deduplicated, sent.queue
    FROM t JOIN sent ON sent.i = t.i
    ORDER BY t.i;
END $$;

-- One scheduler pass over one schedule: enqueue the ticks given that are after the
-- watermark and not ahead of the database clock, and move the watermark to p_advance_to
-- (the latest tick due, enqueued or skipped by the catch-up policy), never backwards, in
-- one transaction under the row's lock. p_fingerprint must be the row's: a scheduler whose
-- code defines the schedule differently (an old version, during a rolling deploy) leaves it
-- to the one that defined it last. A call with a tick (or p_advance_to) ahead of the
-- database's clock changes nothing: it was computed on another clock. Returns what
-- happened: 'fired' (one row per tick sent), 'nothing' (nothing left to send: another
-- scheduler was first), 'early', 'paused', 'orphaned', 'changed' or 'missing'.
CREATE FUNCTION pgtasks.schedule_fire(
    p_name         text,
    p_fingerprint  text,
    p_ticks        timestamptz[],
    p_advance_to   timestamptz,
    p_next_tick    timestamptz
) RETURNS TABLE (state text, tick timestamptz, msg_id bigint, deduplicated boolean)
LANGUAGE plpgsql AS $$
DECLARE
    r        pgtasks.schedules;
    v_now    timestamptz := clock_timestamp();
    v_ticks  timestamptz[];
    v_sent   timestamptz[];
    v_ids    bigint[];
    v_dups   boolean[];
    v_queue  text;
    v_n      integer;
BEGIN
    SELECT * INTO r FROM pgtasks.schedules AS s WHERE s.name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'missing'::text, NULL::timestamptz, NULL::bigint, NULL::boolean;
        RETURN;
    ELSIF r.fingerprint <> p_fingerprint THEN
        RETURN QUERY SELECT 'changed'::text, NULL::timestamptz, NULL::bigint, NULL::boolean;
        RETURN;
    ELSIF r.orphaned_at IS NOT NULL THEN
        RETURN QUERY SELECT 'orphaned'::text, NULL::timestamptz, NULL::bigint, NULL::boolean;
        RETURN;
    ELSIF r.paused_at IS NOT NULL THEN
        UPDATE pgtasks.schedules AS s SET next_tick = p_next_tick WHERE s.name = p_name;
        RETURN QUERY SELECT 'paused'::text, NULL::timestamptz, NULL::bigint, NULL::boolean;
        RETURN;
    END IF;
    IF p_advance_to > v_now OR EXISTS (SELECT 1 FROM unnest(p_ticks) AS x WHERE x > v_now) THEN
        -- computed on another clock than ours: nothing is sent and nothing moves
        RETURN QUERY SELECT 'early'::text, NULL::timestamptz, NULL::bigint, NULL::boolean;
        RETURN;
    END IF;
    SELECT array_agg(u.t ORDER BY u.t) INTO v_ticks
    FROM (SELECT DISTINCT x AS t FROM unnest(p_ticks) AS x) AS u
    WHERE u.t > r.watermark;
    IF v_ticks IS NULL THEN
        UPDATE pgtasks.schedules AS s
        SET watermark = greatest(s.watermark, p_advance_to),
            next_tick = p_next_tick
        WHERE s.name = p_name;
        RETURN QUERY SELECT 'nothing'::text, NULL::timestamptz, NULL::bigint, NULL::boolean;
        RETURN;
    END IF;
    SELECT array_agg(x.tick ORDER BY x.tick), array_agg(x.msg_id ORDER BY x.tick),
           array_agg(x.deduplicated ORDER BY x.tick), max(x.queue)
        INTO v_sent, v_ids, v_dups, v_queue
        FROM pgtasks.schedule_send(r, v_ticks) AS x;
    v_n := array_length(v_sent, 1);
    UPDATE pgtasks.schedules AS s
    SET watermark = greatest(s.watermark, p_advance_to, v_sent[v_n]),
        next_tick = p_next_tick,
        last_tick = greatest(s.last_tick, v_sent[v_n]),
        last_msg_id = v_ids[v_n],
        last_queue = v_queue,
        last_key = pgtasks.schedule_key(s.name, v_sent[v_n])
    WHERE s.name = p_name;
    RETURN QUERY SELECT 'fired'::text, u.t, u.id, u.d
        FROM unnest(v_sent, v_ids, v_dups) AS u(t, id, d);
END $$;

-- Run a schedule once, now (pgtasks schedules trigger NAME): one job whose tick is the
-- database's now(), under the same kind of key; the watermark does not move, so the
-- schedule's own ticks are not affected. Refused for a schedule no running scheduler
-- defines (its task may be gone).
CREATE FUNCTION pgtasks.schedule_trigger(p_name text)
RETURNS TABLE (tick timestamptz, msg_id bigint, deduplicated boolean, queue text, task text)
LANGUAGE plpgsql AS $$
DECLARE
    r  pgtasks.schedules;
    v  record;
BEGIN
    SELECT * INTO r FROM pgtasks.schedules AS s WHERE s.name = p_name FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no schedule named %', quote_literal(p_name)
            USING ERRCODE = 'no_data_found';
    END IF;
    IF r.orphaned_at IS NOT NULL THEN
        RAISE EXCEPTION 'schedule % is orphaned: no running scheduler has defined it since %',
            quote_literal(p_name), r.seen_at USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT * INTO v FROM pgtasks.schedule_send(r, ARRAY[now()]) AS x;
    UPDATE pgtasks.schedules AS s
    SET last_msg_id = v.msg_id, last_queue = v.queue,
        last_key = pgtasks.schedule_key(s.name, v.tick)
    WHERE s.name = p_name;
    RETURN QUERY SELECT v.tick, v.msg_id, v.deduplicated, v.queue, r.task;
END $$;

-- The state of the job a schedule sent last, from what pgtasks keeps: 'waiting' (visible,
-- or delayed), 'running' (claimed and leased), 'retrying' (its last attempt failed; waiting
-- for the backoff), 'succeeded' (archived, or deleted with its key marked succeeded),
-- 'dead' (in the dead letters), or NULL when none of these knows it (deleted by hand,
-- pruned). The message is recognised by its queue, id and idempotency key, so a queue
-- dropped and created again (its ids start over) is not mistaken for it.
CREATE FUNCTION pgtasks.schedule_job_state(p_queue text, p_msg_id bigint, p_key text)
RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    m    record;
    v_n  integer;
BEGIN
    IF p_queue IS NULL OR p_msg_id IS NULL THEN
        RETURN NULL;
    END IF;
    IF to_regclass(format('pgmq.%I', 'q_' || p_queue)) IS NOT NULL THEN
        EXECUTE format('SELECT read_ct, vt, last_read_at FROM pgmq.%I '
                       'WHERE msg_id = $1 AND headers ->> ''idempotency_key'' = $2',
                       'q_' || p_queue)
            INTO m USING p_msg_id, p_key;
        GET DIAGNOSTICS v_n = ROW_COUNT;  -- (EXECUTE does not set FOUND)
        IF v_n > 0 THEN
            IF m.read_ct = 0 OR m.vt <= clock_timestamp() THEN
                RETURN 'waiting';
            ELSIF EXISTS (SELECT 1 FROM pgtasks.attempt_errors AS e
                          WHERE e.queue = p_queue AND e.msg_id = p_msg_id
                            AND e.failed_at >= m.last_read_at) THEN
                RETURN 'retrying';
            END IF;
            RETURN 'running';
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM pgtasks.dead_letters AS d
               WHERE d.queue = p_queue AND d.msg_id = p_msg_id
                 AND d.headers ->> 'idempotency_key' = p_key) THEN
        RETURN 'dead';
    END IF;
    IF EXISTS (SELECT 1 FROM pgtasks.idempotency_keys AS k
               WHERE k.key = p_key AND k.msg_id = p_msg_id AND k.expires_at IS NOT NULL) THEN
        RETURN 'succeeded';
    END IF;
    IF to_regclass(format('pgmq.%I', 'a_' || p_queue)) IS NOT NULL THEN
        EXECUTE format('SELECT 1 FROM pgmq.%I '
                       'WHERE msg_id = $1 AND headers ->> ''idempotency_key'' = $2',
                       'a_' || p_queue)
            INTO m USING p_msg_id, p_key;
        GET DIAGNOSTICS v_n = ROW_COUNT;
        IF v_n > 0 THEN
            RETURN 'succeeded';
        END IF;
    END IF;
    RETURN NULL;
END $$;

-- The group roles (0002): the worker role runs schedulers and the schedules commands. A
-- later migration that grants more does the same as this one: keep the previous
-- grant_roles under another name, and call it from the new one.
ALTER FUNCTION pgtasks.grant_roles() RENAME TO grant_roles_before_0008;
CREATE FUNCTION pgtasks.grant_roles() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pgtasks.grant_roles_before_0008();
    IF to_regrole('pgtasks_producer') IS NULL OR to_regrole('pgtasks_worker') IS NULL THEN
        RETURN;
    END IF;
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgtasks.schedules TO pgtasks_worker;
    GRANT EXECUTE ON FUNCTION
        pgtasks.schedule_key(text, timestamptz),
        pgtasks.schedule_send(pgtasks.schedules, timestamptz[]),
        pgtasks.schedule_fire(text, text, timestamptz[], timestamptz, timestamptz),
        pgtasks.schedule_trigger(text),
        pgtasks.schedule_job_state(text, bigint, text)
        TO pgtasks_worker;
END $$;
REVOKE ALL ON FUNCTION pgtasks.grant_roles() FROM PUBLIC;
REVOKE ALL ON FUNCTION pgtasks.grant_roles_before_0008() FROM PUBLIC;
-- roles granted before this migration get the new privileges now (a no-op without roles)
SELECT pgtasks.grant_roles();

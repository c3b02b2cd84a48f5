-- pgtasks 0013: storage settings for every queue's tables, set when a queue is created and
-- on the queues that exist.
--
-- A queue table (pgmq.q_<name>) is small and churns: every claim and every lease extension
-- is an UPDATE of vt, every acknowledgement a DELETE. vt is indexed (pgtasks claims in vt
-- order through q_<name>_vt_idx), so none of those updates can be a HOT update, and a lower
-- fillfactor would only leave pages emptier: measured by benchmarks/storage.py (a drain
-- under fillfactor 100 and 70: n_tup_hot_upd = 0 both times). What keeps a queue table fast
-- is vacuum coming often: PostgreSQL's defaults wait for 20% of the table to be dead, ours
-- for 1% (plus 50 rows), and do not throttle it (cost_delay 0: the table is small, and a
-- throttled vacuum only stretches the time claims walk past dead rows).
--
-- An archive (pgmq.a_<name>) is append-only between two retention passes, which then
-- delete its oldest rows. Insert-triggered vacuum (PostgreSQL 13+) at 5% of the table
-- instead of 20% keeps its visibility map current, so the vacuum that follows a retention
-- pass skips the pages no one changed; a vacuum comes after 5% of it is deleted.
--
-- pgtasks.queue_storage_options is the one definition of the settings; queue_storage sets
-- them on a queue's tables that have no storage settings at all (a table an operator tuned
-- is left as it is), taking each table's lock for at most 2 seconds: ALTER TABLE ... SET
-- takes SHARE UPDATE EXCLUSIVE, which claims, acks and enqueues (ROW EXCLUSIVE) do not
-- conflict with, but a running VACUUM or CREATE INDEX CONCURRENTLY does. A table it could
-- not lock keeps its settings and is reported (WARNING); `migrate` sets it the next time,
-- as it does for any pgtasks queue whose tables have none (a queue made with plain
-- pgmq.create, say).

CREATE FUNCTION pgtasks.queue_storage_options(p_kind text) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_kind
        WHEN 'q' THEN ARRAY[
            'autovacuum_vacuum_scale_factor=0.01',
            'autovacuum_vacuum_threshold=50',
            'autovacuum_vacuum_cost_delay=0',
            'autovacuum_analyze_scale_factor=0.05']
        WHEN 'a' THEN ARRAY[
            'autovacuum_vacuum_scale_factor=0.05',
            'autovacuum_vacuum_threshold=1000',
            'autovacuum_vacuum_insert_scale_factor=0.05',
            'autovacuum_analyze_scale_factor=0.05']
    END
$$;
COMMENT ON FUNCTION pgtasks.queue_storage_options(text) IS
    'pgtasks'' storage settings (reloptions) of a queue table (''q'') and of an archive (''a'')';

-- Set pgtasks' storage settings on this queue's tables that have none; returns the tables
-- set (with p_dry_run: that would be set, changing nothing). Plain tables of this
-- function's owner only: a partitioned queue's parent takes no storage settings, and a
-- table of another role cannot be altered by this one.
CREATE FUNCTION pgtasks.queue_storage(p_queue text, p_dry_run boolean DEFAULT false)
RETURNS text[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET lock_timeout = '2s'
AS $$
DECLARE
    v_kind  text;
    v_rel   regclass;
    v_done  text[] := '{}';
BEGIN
    PERFORM pgtasks.check_queue_name(p_queue);
    FOREACH v_kind IN ARRAY ARRAY['q', 'a'] LOOP
        v_rel := to_regclass(format('pgmq.%I', v_kind || '_' || p_queue));
        CONTINUE WHEN v_rel IS NULL OR NOT EXISTS (
            SELECT 1 FROM pg_class AS c
            WHERE c.oid = v_rel AND c.relkind = 'r' AND c.reloptions IS NULL
              AND pg_has_role(current_user, c.relowner, 'MEMBER'));
        IF NOT p_dry_run THEN
            BEGIN
                -- the settings are our own constants, the table a validated name
                EXECUTE format('ALTER TABLE %s SET (%s)', v_rel,
                               array_to_string(pgtasks.queue_storage_options(v_kind), ', '));
            EXCEPTION WHEN lock_not_available THEN
                RAISE WARNING 'pgtasks: % is locked (by a VACUUM or a schema change); its '
                    'storage settings were not set: run migrate again later', v_rel;
                CONTINUE;
            END;
        END IF;
        v_done := v_done || v_rel::text;
    END LOOP;
    RETURN v_done;
END $$;
REVOKE ALL ON FUNCTION pgtasks.queue_storage(text, boolean) FROM PUBLIC;

-- Queues created from now on get the settings in the transaction that creates them.
CREATE OR REPLACE FUNCTION pgtasks.ensure_queue(p_queue text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pgtasks.check_queue_name(p_queue);
    IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = p_queue) THEN
        PERFORM pgmq.create(p_queue);
        PERFORM pgtasks.queue_storage(p_queue);
    END IF;
END $$;

-- The queues that exist get them from migrate once this has committed, a transaction per
-- queue (db/schema.py, step 6): here, in the migration's one transaction, each ALTER TABLE's
-- lock would be held until the end, two per queue, more than the server's lock table holds
-- past a few thousand queues.

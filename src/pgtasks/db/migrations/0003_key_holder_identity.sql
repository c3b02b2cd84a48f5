-- pgtasks 0003: a key is held by its message, not by whatever message has its id now.
--
-- A queue dropped and created again starts its msg_ids at 1 again, so "the key's message
-- still exists" (queue, msg_id) could be answered by an unrelated message, and a keyed
-- defer would then join a job that has nothing to do with it. A key and its message are
-- written in one transaction, so the key's created_at equals the message's enqueued_at
-- (both are that transaction's now()): compare that too.

CREATE OR REPLACE FUNCTION pgtasks.claim_key(p_key text, p_queue text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    r       pgtasks.idempotency_keys;
    v_held  boolean := false;
BEGIN
    INSERT INTO pgtasks.idempotency_keys (key, queue) VALUES (p_key, p_queue)
        ON CONFLICT (key) DO NOTHING;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO r FROM pgtasks.idempotency_keys WHERE key = p_key FOR UPDATE;
    IF r.msg_id IS NOT NULL AND r.expires_at IS NULL
       AND to_regclass(format('pgmq.%I', 'q_' || r.queue)) IS NOT NULL THEN
        EXECUTE format(
            'SELECT EXISTS (SELECT 1 FROM pgmq.%I WHERE msg_id = $1 AND enqueued_at = $2)',
            'q_' || r.queue)
            INTO v_held USING r.msg_id, r.created_at;
    END IF;
    IF r.msg_id IS NOT NULL AND (v_held OR r.expires_at > now()) THEN
        RETURN r.msg_id;
    END IF;
    UPDATE pgtasks.idempotency_keys
        SET queue = p_queue, msg_id = NULL, created_at = now(), expires_at = NULL
        WHERE key = p_key;
    RETURN NULL;
END $$;

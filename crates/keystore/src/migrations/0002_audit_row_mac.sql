-- Each audit record a verifier writes carries an authenticator: HMAC-SHA256,
-- under a key derived from the store's root, of its sequence number and
-- its line (which holds prev_hash, so it is tied to the chain before it). Whoever can write the database without holding the root (anyone
-- with the replicas' credentials) could otherwise add records at the end of
-- the chain, with valid hashes, that every replica would build on and the
-- next signed checkpoint would cover.
--
-- Records written before this migration have none. Every record after
-- `through` below (the head when the migration ran: on a new store, 0) must
-- have one, and so must every record after the first that has one: a
-- verifier refuses such a record without a valid one, and the triggers
-- below refuse to store it at all (an older replica still running when the
-- migration is applied cannot go on writing records without one), or to
-- change `through`. Only the tables' owner or a superuser can drop the
-- triggers; what they can then do is a rewrite, which the chain, the anchor
-- in the store and the signed checkpoints show (docs/evidence.md).
ALTER TABLE kluis_audit
    ADD COLUMN mac BYTEA CHECK (mac IS NULL OR octet_length(mac) = 32);

CREATE TABLE kluis_audit_legacy (
    singleton  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    through    BIGINT NOT NULL CHECK (through >= 0)
);
INSERT INTO kluis_audit_legacy (through) SELECT seq FROM kluis_audit_head;

CREATE TRIGGER kluis_audit_legacy_fixed BEFORE UPDATE OR DELETE ON kluis_audit_legacy
    FOR EACH ROW EXECUTE FUNCTION kluis_audit_append_only();
CREATE TRIGGER kluis_audit_legacy_no_truncate BEFORE TRUNCATE ON kluis_audit_legacy
    FOR EACH STATEMENT EXECUTE FUNCTION kluis_audit_append_only();

CREATE FUNCTION kluis_audit_authenticated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.mac IS NULL THEN
        RAISE EXCEPTION 'kluis_audit: record % has no authenticator', NEW.seq;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER kluis_audit_needs_mac BEFORE INSERT ON kluis_audit
    FOR EACH ROW EXECUTE FUNCTION kluis_audit_authenticated();

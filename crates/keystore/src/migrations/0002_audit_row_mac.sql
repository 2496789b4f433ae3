-- Each audit record a verifier writes carries an authenticator: HMAC-SHA256,
-- under a key derived from the store's root, of its sequence number and
-- hash (which covers the record and, through prev_hash, the chain before
-- it). Whoever can write the database without holding the root (its
-- administrators, anyone with the replicas' credentials) could otherwise add
-- records at the end of the chain, with valid hashes, that every replica
-- would build on and the next signed checkpoint would cover.
--
-- Records written before this migration have none. Once any record has
-- one, every later record must: a verifier refuses a record without a valid
-- one after the first that has it, and after `through` below (the head
-- when the migration ran: on a new store, 0, so every record needs one).
ALTER TABLE kluis_audit
    ADD COLUMN mac BYTEA CHECK (mac IS NULL OR octet_length(mac) = 32);

CREATE TABLE kluis_audit_legacy (
    singleton  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    through    BIGINT NOT NULL CHECK (through >= 0)
);
INSERT INTO kluis_audit_legacy (through) SELECT seq FROM kluis_audit_head;

-- Kluis verifier state, schema version 1.
--
-- What a database administrator can read here, in plaintext columns:
--   kluis_store_meta  the store's format, KDF parameters, salt and key-check
--                     value (as store.meta in a directory store: public);
--   kluis_store_config for a store whose keys are in an HSM, the token's
--                     module and label and the wrapped store root (as
--                     hsm.json: the root is usable only inside the token);
--   kluis_records     each record's kind (cmk, policy, admin, system, ...)
--                     and name tag (HMAC-SHA256 under a key derived from the
--                     root secret, not the key's name); the body is
--                     AES-256-GCM ciphertext bound to kind and tag;
--   kluis_audit       the audit log's records: they are evidence and are
--                     meant to be read (key names, versions, decisions,
--                     measurements, never key material);
--   kluis_audit_head  the last record's sequence number and hash;
--   kluis_nonces      challenge nonces (random, public once issued), their
--                     expiry and whether they were used.

CREATE TABLE kluis_store_meta (
    singleton  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    meta       BYTEA NOT NULL CHECK (octet_length(meta) <= 65536)
);

-- Public settings of the store kept beside its metadata, by name: "hsm"
-- holds what hsm.json holds in a store directory (the token's module and
-- label, the store root wrapped by a token key, the identity key's id and
-- public key), written once by init.
CREATE TABLE kluis_store_config (
    name   TEXT  PRIMARY KEY CHECK (octet_length(name) BETWEEN 1 AND 64),
    value  BYTEA NOT NULL CHECK (octet_length(value) <= 65536)
);

CREATE TABLE kluis_records (
    kind  TEXT  NOT NULL CHECK (octet_length(kind) BETWEEN 1 AND 64),
    tag   BYTEA NOT NULL CHECK (octet_length(tag) = 32),
    body  BYTEA NOT NULL,
    PRIMARY KEY (kind, tag)
);

CREATE TABLE kluis_audit (
    seq   BIGINT PRIMARY KEY CHECK (seq > 0),
    line  BYTEA  NOT NULL
);

-- One row: the head of the chain. Appends lock it (SELECT ... FOR UPDATE),
-- which gives the records of every replica one total order.
CREATE TABLE kluis_audit_head (
    singleton  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    seq        BIGINT NOT NULL CHECK (seq >= 0),
    hash       BYTEA  NOT NULL CHECK (octet_length(hash) = 48)
);
INSERT INTO kluis_audit_head (seq, hash) VALUES (0, decode(repeat('00', 48), 'hex'));

-- The audit log is append-only for the verifier's own connections too: a
-- record cannot be changed or removed through SQL without first dropping
-- these triggers (which a superuser can do; the evidence checkpoints signed
-- by the verifier's identity are what show such a rewrite, docs/evidence.md).
CREATE FUNCTION kluis_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'kluis_audit is append-only';
END;
$$;
CREATE TRIGGER kluis_audit_no_update BEFORE UPDATE OR DELETE ON kluis_audit
    FOR EACH ROW EXECUTE FUNCTION kluis_audit_append_only();
CREATE TRIGGER kluis_audit_no_truncate BEFORE TRUNCATE ON kluis_audit
    FOR EACH STATEMENT EXECUTE FUNCTION kluis_audit_append_only();

CREATE TABLE kluis_nonces (
    nonce       BYTEA   PRIMARY KEY CHECK (octet_length(nonce) = 32),
    expires_ms  BIGINT  NOT NULL,
    used        BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX kluis_nonces_expiry ON kluis_nonces (expires_ms);

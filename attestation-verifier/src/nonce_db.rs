//! Challenge nonces shared by the replicas of a verifier, in the store's
//! PostgreSQL database: a challenge issued by one replica may be redeemed
//! at any replica, exactly once.
//!
//! Each replica still tracks the nonces it issued in its own bounded
//! [`NonceStore`](crate::nonce::NonceStore) (the cap on outstanding
//! challenges and each connection's open challenges); the database decides
//! redemption. Redeeming is one statement that locks the nonce's row and
//! marks it used, so of two replicas redeeming the same nonce at once the
//! second waits for the first and finds it used. If the database cannot be
//! reached, no challenge is issued and none is redeemed: the broker answers
//! `unavailable`.

use crate::nonce::{NonceError, NONCE_LEN};
use kluis_keystore::pg::reason;
use kluis_keystore::Database;
use std::sync::atomic::{AtomicU64, Ordering};

/// Issues between two sweeps of expired rows.
const SWEEP_EVERY: u64 = 1024;

/// The nonce table of the store's database.
#[derive(Debug)]
pub struct DbNonces {
    db: Database,
    issued: AtomicU64,
}

impl DbNonces {
    /// The nonces of `db`.
    pub fn new(db: Database) -> Self {
        DbNonces {
            db,
            issued: AtomicU64::new(0),
        }
    }

    /// Records `nonce`, valid until `expires_ms`. Every 1024
    /// issues, removes the rows that expired before `now_ms`.
    pub fn issue(
        &self,
        nonce: &[u8; NONCE_LEN],
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(), NonceError> {
        let mut client = self.client()?;
        let expires = to_sql(expires_ms);
        client
            .execute(
                "INSERT INTO kluis_nonces (nonce, expires_ms) VALUES ($1, $2)",
                &[&nonce.as_slice(), &expires],
            )
            .map_err(|e| self.unavailable("issue a nonce", &e))?;
        if self
            .issued
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_EVERY)
        {
            if let Err(e) = client.execute(
                "DELETE FROM kluis_nonces WHERE expires_ms < $1",
                &[&to_sql(now_ms)],
            ) {
                tracing::warn!(error = %reason(&e), "could not sweep expired nonces");
            }
        }
        Ok(())
    }

    /// Redeems `nonce` at `now_ms`: succeeds once, for an issued, unexpired
    /// nonce, at whichever replica asks first.
    pub fn consume(&self, nonce: Option<&[u8]>, now_ms: u64) -> Result<(), NonceError> {
        let key: [u8; NONCE_LEN] = nonce
            .and_then(|n| n.try_into().ok())
            .ok_or(NonceError::Missing)?;
        let mut client = self.client()?;
        let row = client
            .query_opt(
                "UPDATE kluis_nonces n SET used = TRUE \
                 FROM (SELECT nonce, used AS was_used FROM kluis_nonces \
                       WHERE nonce = $1 FOR UPDATE) o \
                 WHERE n.nonce = o.nonce \
                 RETURNING o.was_used, n.expires_ms",
                &[&key.as_slice()],
            )
            .map_err(|e| self.unavailable("redeem a nonce", &e))?;
        let Some(row) = row else {
            return Err(NonceError::Unknown);
        };
        let was_used: bool = row
            .try_get(0)
            .map_err(|e| self.unavailable("redeem a nonce", &e))?;
        let expires_ms: i64 = row
            .try_get(1)
            .map_err(|e| self.unavailable("redeem a nonce", &e))?;
        if was_used {
            return Err(NonceError::Reused);
        }
        if to_sql(now_ms) >= expires_ms {
            return Err(NonceError::Expired);
        }
        Ok(())
    }

    /// Withdraws an issued nonce that was never used (best effort).
    pub fn withdraw(&self, nonces: &[[u8; NONCE_LEN]]) {
        if nonces.is_empty() {
            return;
        }
        let Ok(mut client) = self.db.client() else {
            return;
        };
        let keys: Vec<&[u8]> = nonces.iter().map(|n| n.as_slice()).collect();
        if let Err(e) = client.execute(
            "DELETE FROM kluis_nonces WHERE nonce = ANY($1) AND NOT used",
            &[&keys],
        ) {
            tracing::debug!(error = %reason(&e), "could not withdraw nonces");
        }
    }

    fn client(&self) -> Result<kluis_keystore::pg::PooledClient, NonceError> {
        self.db.client().map_err(|e| {
            tracing::error!(error = %e, "nonce store unavailable");
            NonceError::Unavailable
        })
    }

    fn unavailable(&self, action: &str, e: &postgres::Error) -> NonceError {
        tracing::error!(error = %reason(e), database = %self.db.target(), "could not {action}");
        NonceError::Unavailable
    }
}

fn to_sql(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

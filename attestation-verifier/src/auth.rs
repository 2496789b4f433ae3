//! Administrator authentication and separation of duties.
//!
//! Two roles: the **key administrator** manages master keys (create, rotate,
//! disable, enable, schedule and cancel deletion, destroy); the **application
//! administrator** manages policy and use (policies, controller-side data
//! encryption and decryption, running the key-release service). Reading
//! metadata and the audit log needs either role. An administrator can add
//! administrators of their own role only, so neither role can grant itself the
//! other.
//!
//! A credential is `kluis1.<name>.<secret>` where the secret is 32 random bytes
//! in base64url. The store keeps only SHA-256 of the secret (the secret has 256
//! bits of entropy, so a slow hash adds nothing), compared in constant time.
//! Credentials are held in zeroizing strings and never logged or printed
//! except once, to a file of mode 0600, when created.

use base64::Engine;
use serde::{Deserialize, Serialize};
use std::fmt;
use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::Zeroizing;

/// An administrator role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Manages master keys.
    KeyAdmin,
    /// Manages policy and use.
    AppAdmin,
}

impl Role {
    /// `key-admin` or `app-admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::KeyAdmin => "key-admin",
            Role::AppAdmin => "app-admin",
        }
    }

    /// Parse `key-admin` / `app-admin`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "key-admin" => Some(Role::KeyAdmin),
            "app-admin" => Some(Role::AppAdmin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an administrator may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Create, rotate, disable, enable, delete master keys.
    ManageKeys,
    /// Set policies.
    ManagePolicy,
    /// Encrypt and decrypt data on the controller side.
    UseData,
    /// Run the key-release service.
    Serve,
    /// Read key metadata, policies and the audit log.
    Read,
    /// Add an administrator of the given role.
    AddAdmin(Role),
}

impl Role {
    /// Whether this role grants `permission`.
    pub fn allows(self, permission: Permission) -> bool {
        match permission {
            Permission::ManageKeys => self == Role::KeyAdmin,
            Permission::ManagePolicy | Permission::UseData | Permission::Serve => {
                self == Role::AppAdmin
            }
            Permission::Read => true,
            Permission::AddAdmin(role) => self == role,
        }
    }
}

/// Errors of authentication.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// No credential was given.
    #[error("this command needs an administrator credential (--credential FILE or KLUIS_CREDENTIAL_FILE)")]
    Missing,
    /// The credential is malformed, unknown or wrong. Deliberately one error.
    #[error("credential rejected")]
    Rejected,
    /// Authenticated, but the role does not allow this.
    #[error("{name} ({role}) is not allowed to {action}")]
    Forbidden {
        /// Who.
        name: String,
        /// Their role.
        role: Role,
        /// What they tried.
        action: String,
    },
    /// An administrator name that is not acceptable.
    #[error("invalid administrator name: {0}")]
    InvalidName(&'static str),
}

/// The stored verifier for one administrator. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminRecord {
    /// The administrator's name.
    pub name: String,
    /// Their role.
    pub role: Role,
    /// SHA-256 of the credential's secret part, hex.
    pub secret_sha256: String,
    /// Creation time, Unix ms.
    pub created_ms: u64,
}

/// A credential as presented: zeroized on drop, never printed.
pub struct Credential(Zeroizing<String>);

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

impl Credential {
    /// Wrap the text of a credential (surrounding whitespace is ignored).
    pub fn new(text: Zeroizing<String>) -> Self {
        Credential(text)
    }

    /// The credential text (to write it to its 0600 file once).
    pub fn expose(&self) -> &str {
        self.0.trim()
    }

    /// The administrator name the credential claims (not yet authenticated).
    pub fn claimed_name(&self) -> Result<&str, AuthError> {
        self.parts().map(|(name, _)| name)
    }

    fn parts(&self) -> Result<(&str, &str), AuthError> {
        let rest = self
            .0
            .trim()
            .strip_prefix("kluis1.")
            .ok_or(AuthError::Rejected)?;
        rest.split_once('.').ok_or(AuthError::Rejected)
    }
}

/// Validate an administrator name: 1..=64 of `[a-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<(), AuthError> {
    if name.is_empty() || name.len() > 64 {
        return Err(AuthError::InvalidName("must be 1 to 64 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
    {
        return Err(AuthError::InvalidName(
            "may hold a-z, 0-9, '_' and '-' only",
        ));
    }
    Ok(())
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

/// Make a new administrator: the record to store and the credential to hand over.
pub fn new_admin(
    name: &str,
    role: Role,
    now_ms: u64,
) -> Result<(AdminRecord, Credential), AuthError> {
    use aws_lc_rs::rand::SecureRandom;
    validate_name(name)?;
    let mut secret = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::SystemRandom::new()
        .fill(secret.as_mut())
        .map_err(|_| AuthError::Rejected)?;
    let encoded =
        Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret.as_ref()));
    let record = AdminRecord {
        name: name.to_owned(),
        role,
        secret_sha256: sha256_hex(encoded.as_bytes()),
        created_ms: now_ms,
    };
    let credential = Credential(Zeroizing::new(format!(
        "kluis1.{name}.{}",
        encoded.as_str()
    )));
    Ok((record, credential))
}

/// An authenticated administrator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
}

impl Admin {
    /// Check a permission.
    pub fn require(&self, permission: Permission, action: &str) -> Result<(), AuthError> {
        if self.role.allows(permission) {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                name: self.name.clone(),
                role: self.role,
                action: action.to_owned(),
            })
        }
    }
}

/// Check `credential` against the stored `record` (looked up by the claimed
/// name; `None` when there is no such administrator).
pub fn authenticate(
    credential: &Credential,
    record: Option<&AdminRecord>,
) -> Result<Admin, AuthError> {
    let (name, secret) = credential.parts()?;
    // Compute the hash even when the name is unknown, so timing does not tell.
    let presented = sha256_hex(secret.as_bytes());
    let Some(record) = record else {
        return Err(AuthError::Rejected);
    };
    let equal: bool = presented
        .as_bytes()
        .ct_eq(record.secret_sha256.as_bytes())
        .into();
    if !equal || record.name != name {
        return Err(AuthError::Rejected);
    }
    Ok(Admin {
        name: record.name.clone(),
        role: record.role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_separated() {
        assert!(Role::KeyAdmin.allows(Permission::ManageKeys));
        assert!(!Role::KeyAdmin.allows(Permission::ManagePolicy));
        assert!(!Role::KeyAdmin.allows(Permission::UseData));
        assert!(!Role::AppAdmin.allows(Permission::ManageKeys));
        assert!(Role::AppAdmin.allows(Permission::ManagePolicy));
        assert!(Role::AppAdmin.allows(Permission::Serve));
        assert!(!Role::AppAdmin.allows(Permission::AddAdmin(Role::KeyAdmin)));
        assert!(!Role::KeyAdmin.allows(Permission::AddAdmin(Role::AppAdmin)));
        assert!(Role::KeyAdmin.allows(Permission::Read) && Role::AppAdmin.allows(Permission::Read));
    }

    #[test]
    fn credential_round_trip_and_rejections() {
        let (record, cred) = new_admin("alice", Role::KeyAdmin, 1).unwrap();
        assert!(!serde_json::to_string(&record)
            .unwrap()
            .contains(cred.expose().rsplit('.').next().unwrap()));
        let admin = authenticate(&cred, Some(&record)).unwrap();
        assert_eq!(
            admin,
            Admin {
                name: "alice".into(),
                role: Role::KeyAdmin
            }
        );

        let (other_record, other) = new_admin("alice", Role::KeyAdmin, 1).unwrap();
        assert_eq!(
            authenticate(&other, Some(&record)),
            Err(AuthError::Rejected)
        );
        assert_eq!(
            authenticate(&cred, Some(&other_record)),
            Err(AuthError::Rejected)
        );
        assert_eq!(authenticate(&cred, None), Err(AuthError::Rejected));
        for bad in [
            "",
            "kluis1.",
            "kluis1.alice",
            "nope.alice.x",
            "kluis1.alice.AAAA",
        ] {
            let c = Credential::new(Zeroizing::new(bad.to_owned()));
            assert_eq!(
                authenticate(&c, Some(&record)),
                Err(AuthError::Rejected),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn credentials_never_print() {
        let (_, cred) = new_admin("bob", Role::AppAdmin, 1).unwrap();
        assert_eq!(format!("{cred:?}"), "Credential(<redacted>)");
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("ops-1").is_ok());
        for bad in ["", "Alice", "a.b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}

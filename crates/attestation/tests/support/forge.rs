//! A document forger for negative tests: builds AWS-shaped chains and documents
//! with one knob turned at a time, signed for real, so that every verifier rule
//! can be shown to fire on its own.
//!
//! The simulator (`kluis_nsm::sim`) makes *correct* documents; this makes wrong
//! ones on purpose. It reuses the simulator's COSE encoding.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};
use ciborium::value::Value;
use kluis_nsm::sim::cose::{encode_sign1, sig_structure, PROTECTED_ES384};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SignatureAlgorithm,
};
use std::sync::Arc;
use time::OffsetDateTime;

/// How one certificate of the chain is made.
#[derive(Clone, PartialEq)]
pub struct CertSpec {
    /// Common name.
    pub cn: String,
    /// basicConstraints.
    pub is_ca: IsCa,
    /// keyUsage bits (empty: no extension).
    pub key_usages: Vec<KeyUsagePurpose>,
    /// Key algorithm of this certificate's own key.
    pub key_alg: &'static SignatureAlgorithm,
    /// Validity, Unix seconds.
    pub not_before: i64,
    /// Validity, Unix seconds.
    pub not_after: i64,
    /// Add an unknown critical extension.
    pub unknown_critical_extension: bool,
    /// Name the issuer differently from its issuer's subject.
    pub wrong_issuer_name: bool,
    /// Sign with a key other than the issuer's.
    pub signed_by_stranger: bool,
}

impl CertSpec {
    fn ca(cn: &str, path_len: Option<u8>, not_before: i64, not_after: i64) -> Self {
        CertSpec {
            cn: cn.to_owned(),
            is_ca: IsCa::Ca(match path_len {
                Some(n) => BasicConstraints::Constrained(n),
                None => BasicConstraints::Unconstrained,
            }),
            key_usages: vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ],
            key_alg: &rcgen::PKCS_ECDSA_P384_SHA384,
            not_before,
            not_after,
            unknown_critical_extension: false,
            wrong_issuer_name: false,
            signed_by_stranger: false,
        }
    }
}

/// A whole chain: `certs[0]` is the root, the last is the leaf.
#[derive(Clone)]
pub struct ChainSpec {
    /// Root, regional, zonal, instance, leaf.
    pub certs: Vec<CertSpec>,
}

impl ChainSpec {
    /// A chain shaped like AWS's, every certificate valid around `now_s`.
    pub fn aws_like(now_s: i64) -> Self {
        let day = 86_400;
        let mut leaf = CertSpec::ca("forged-leaf", None, now_s - 3600, now_s + 3 * 3600);
        leaf.is_ca = IsCa::ExplicitNoCa;
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        ChainSpec {
            certs: vec![
                CertSpec::ca("forged-root", None, now_s - 365 * day, now_s + 3650 * day),
                CertSpec::ca("forged-regional", Some(2), now_s - day, now_s + 30 * day),
                CertSpec::ca("forged-zonal", Some(1), now_s - day, now_s + 7 * day),
                CertSpec::ca("forged-instance", Some(0), now_s - day, now_s + 3 * day),
                leaf,
            ],
        }
    }

    /// Index of the leaf.
    pub fn leaf(&self) -> usize {
        self.certs.len() - 1
    }

    /// Make the certificates.
    pub fn forge(&self) -> Forged {
        self.forge_reusing(None)
    }

    /// Make the certificates, reusing from `shared` (bytes and keys) every
    /// certificate whose spec and whose issuers' specs are unchanged: a chain
    /// that differs from a good one only below some point, as a bad document
    /// next to good ones from the same CAs would (what a verifier's link
    /// cache sees).
    pub fn forge_reusing(&self, shared: Option<&Forged>) -> Forged {
        let mut ders: Vec<Vec<u8>> = Vec::new();
        let mut keys: Vec<Arc<KeyPair>> = Vec::new();
        let mut params_list: Vec<CertificateParams> = Vec::new();
        let mut reusing = true;
        for (i, spec) in self.certs.iter().enumerate() {
            reusing = reusing && shared.is_some_and(|f| f.specs.get(i) == Some(spec));
            if let (true, Some(f)) = (reusing, shared) {
                ders.push(f.ders[i].clone());
                keys.push(f.keys[i].clone());
                params_list.push(f.params[i].clone());
                continue;
            }
            let key = KeyPair::generate_for(spec.key_alg).unwrap();
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CountryName, "US");
            dn.push(DnType::OrganizationName, "Kluis Forged");
            dn.push(DnType::CommonName, spec.cn.clone());
            params.distinguished_name = dn;
            params.is_ca = spec.is_ca;
            params.key_usages = spec.key_usages.clone();
            params.not_before = OffsetDateTime::from_unix_timestamp(spec.not_before).unwrap();
            params.not_after = OffsetDateTime::from_unix_timestamp(spec.not_after).unwrap();
            params.serial_number = Some(rcgen::SerialNumber::from(vec![
                1,
                u8::try_from(i).unwrap() + 1,
            ]));
            if spec.unknown_critical_extension {
                let mut ext = CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 4, 1, 99999, 1],
                    vec![0x05, 0x00],
                );
                ext.set_criticality(true);
                params.custom_extensions.push(ext);
            }
            let cert = if i == 0 {
                params.self_signed(&key).unwrap()
            } else {
                let issuer_params = &params_list[i - 1];
                let stranger;
                let issuer_key: &KeyPair = if spec.signed_by_stranger {
                    stranger = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
                    &stranger
                } else {
                    &keys[i - 1]
                };
                let mut issuer_params = issuer_params.clone();
                if spec.wrong_issuer_name {
                    let mut dn = DistinguishedName::new();
                    dn.push(DnType::CommonName, "someone-else");
                    issuer_params.distinguished_name = dn;
                }
                let issuer = Issuer::new(issuer_params, issuer_key);
                params.signed_by(&key, &issuer).unwrap()
            };
            ders.push(cert.der().to_vec());
            keys.push(Arc::new(key));
            params_list.push(params);
        }
        let leaf_pkcs8 = keys.last().unwrap().serialize_der();
        let mut cabundle = ders.clone();
        let leaf_der = cabundle.pop().unwrap();
        Forged {
            root_der: ders[0].clone(),
            cabundle,
            leaf_der,
            leaf_pkcs8,
            specs: self.certs.clone(),
            ders,
            keys,
            params: params_list,
        }
    }
}

/// A forged chain and its leaf key.
#[derive(Clone)]
pub struct Forged {
    /// The root to trust.
    pub root_der: Vec<u8>,
    /// Root first.
    pub cabundle: Vec<Vec<u8>>,
    /// The leaf.
    pub leaf_der: Vec<u8>,
    /// The leaf's private key (test key).
    pub leaf_pkcs8: Vec<u8>,
    /// What made each certificate, root first (for `forge_reusing`).
    specs: Vec<CertSpec>,
    ders: Vec<Vec<u8>>,
    keys: Vec<Arc<KeyPair>>,
    params: Vec<CertificateParams>,
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

impl Forged {
    /// The payload map a real NSM would produce with this chain.
    pub fn payload(&self, timestamp_ms: u64, nonce: Option<&[u8]>) -> Vec<(Value, Value)> {
        let pcrs = (0u8..16)
            .map(|i| (Value::Integer(i.into()), Value::Bytes(vec![i; 48])))
            .collect();
        vec![
            (text("module_id"), text("i-forged-enc0000")),
            (text("digest"), text("SHA384")),
            (text("timestamp"), Value::Integer(timestamp_ms.into())),
            (text("pcrs"), Value::Map(pcrs)),
            (text("certificate"), Value::Bytes(self.leaf_der.clone())),
            (
                text("cabundle"),
                Value::Array(self.cabundle.iter().cloned().map(Value::Bytes).collect()),
            ),
            (text("public_key"), Value::Null),
            (text("user_data"), Value::Null),
            (
                text("nonce"),
                nonce.map_or(Value::Null, |n| Value::Bytes(n.to_vec())),
            ),
        ]
    }

    /// Sign `payload` bytes as the NSM would (protected header `{1: -35}`).
    pub fn sign(&self, payload: &[u8]) -> Vec<u8> {
        self.sign_with_protected(&PROTECTED_ES384, payload)
    }

    /// Sign with an arbitrary protected header.
    pub fn sign_with_protected(&self, protected: &[u8], payload: &[u8]) -> Vec<u8> {
        let tbs = sig_structure(protected, payload).unwrap();
        let signature = self.raw_signature(&tbs);
        encode_sign1(protected, payload, &signature).unwrap()
    }

    /// ECDSA P-384 SHA-384 `r||s` over `message` with the leaf key.
    pub fn raw_signature(&self, message: &[u8]) -> Vec<u8> {
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &self.leaf_pkcs8).unwrap();
        key.sign(&SystemRandom::new(), message)
            .unwrap()
            .as_ref()
            .to_vec()
    }
}

/// CBOR-encode a value.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).unwrap();
    out
}

//! The text form of a workload (`parent run --job SPEC`, and the enclave's
//! `allowed_jobs`).
//!
//! ```text
//! identity
//! reencrypt
//! pseudonymise:column=0[,delimiter=;][,header][,check=nrn]     (secret: the first --secret)
//! aggregate:by=1[,sum=2][,delimiter=;][,header]
//! exec:PROGRAM[,arg=VALUE]...
//! ```

use crate::job::WorkloadSpec;

/// A SPEC that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad job spec: {0}")]
pub struct SpecError(String);

fn delimiter(value: &str) -> Result<u8, SpecError> {
    match value.as_bytes() {
        [b] if b.is_ascii() && *b != b'\n' && *b != b'\r' => Ok(*b),
        _ if value == "tab" => Ok(b'\t'),
        _ => Err(SpecError(format!(
            "delimiter {value:?}: one ASCII character (or `tab`)"
        ))),
    }
}

fn number(key: &str, value: &str) -> Result<u32, SpecError> {
    value
        .parse()
        .map_err(|_| SpecError(format!("{key}={value:?}: a column number")))
}

/// Parse a workload SPEC.
pub fn parse_workload(text: &str) -> Result<WorkloadSpec, SpecError> {
    let (name, params) = text.split_once(':').unwrap_or((text, ""));
    let params: Vec<(&str, Option<&str>)> = params
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        })
        .collect();
    let unknown = |k: &str| SpecError(format!("{name}: unknown parameter {k:?}"));
    match name {
        "identity" | "reencrypt" => {
            if let Some((k, _)) = params.first() {
                return Err(unknown(k));
            }
            Ok(if name == "identity" {
                WorkloadSpec::Identity
            } else {
                WorkloadSpec::Reencrypt
            })
        }
        "pseudonymise" | "pseudonymize" => {
            let (mut column, mut delim, mut header, mut check) = (None, b',', false, false);
            for (k, v) in params {
                match (k, v) {
                    ("column", Some(v)) => column = Some(number(k, v)?),
                    ("delimiter", Some(v)) => delim = delimiter(v)?,
                    ("header", None) => header = true,
                    ("check", Some("nrn")) => check = true,
                    _ => return Err(unknown(k)),
                }
            }
            Ok(WorkloadSpec::Pseudonymise {
                column: column.ok_or_else(|| SpecError("pseudonymise needs column=N".into()))?,
                delimiter: delim,
                secret: 0,
                header,
                check_national_number: check,
            })
        }
        "aggregate" => {
            let (mut by, mut sum, mut delim, mut header) = (None, None, b',', false);
            for (k, v) in params {
                match (k, v) {
                    ("by", Some(v)) => by = Some(number(k, v)?),
                    ("sum", Some(v)) => sum = Some(number(k, v)?),
                    ("delimiter", Some(v)) => delim = delimiter(v)?,
                    ("header", None) => header = true,
                    _ => return Err(unknown(k)),
                }
            }
            Ok(WorkloadSpec::Aggregate {
                by: by.ok_or_else(|| SpecError("aggregate needs by=N".into()))?,
                sum,
                delimiter: delim,
                header,
            })
        }
        "exec" => {
            let mut parts = params.into_iter();
            let program = match parts.next() {
                Some((p, None)) => p.to_owned(),
                _ => return Err(SpecError("exec:PROGRAM[,arg=VALUE]...".into())),
            };
            let mut args = Vec::new();
            for (k, v) in parts {
                match (k, v) {
                    ("arg", Some(v)) => args.push(v.to_owned()),
                    _ => return Err(unknown(k)),
                }
            }
            Ok(WorkloadSpec::Exec { program, args })
        }
        other => Err(SpecError(format!(
            "unknown workload {other:?} (identity, reencrypt, pseudonymise, aggregate, exec)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::parse_workload as parse;
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(parse("identity").unwrap(), WorkloadSpec::Identity);
        assert_eq!(parse("reencrypt").unwrap(), WorkloadSpec::Reencrypt);
        assert_eq!(
            parse("pseudonymise:column=2,delimiter=;,header,check=nrn").unwrap(),
            WorkloadSpec::Pseudonymise {
                column: 2,
                delimiter: b';',
                secret: 0,
                header: true,
                check_national_number: true
            }
        );
        assert_eq!(
            parse("aggregate:by=1,sum=3").unwrap(),
            WorkloadSpec::Aggregate {
                by: 1,
                sum: Some(3),
                delimiter: b',',
                header: false
            }
        );
        assert_eq!(
            parse("exec:wc,arg=-l").unwrap(),
            WorkloadSpec::Exec {
                program: "wc".into(),
                args: vec!["-l".into()]
            }
        );
        for bad in [
            "",
            "nope",
            "identity:x=1",
            "pseudonymise",
            "pseudonymise:column=x",
            "aggregate:sum=1",
            "aggregate:by=1,delimiter=ab",
            "exec:",
            "exec:p,x=1",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}

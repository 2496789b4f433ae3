//! How the programs show an error to a person: one line, each cause once.
//!
//! Shared by every program (the verifier, the parent, the enclave and the
//! demo) because all of them print errors whose types both say their
//! cause in their own message and return it as their `source()` (a
//! `thiserror` type with `{source}` in its message does). Printing the chain
//! as is (`{:#}`) would then say the cause twice.

/// `err` and its causes, joined with `: `, leaving out a cause whose text
/// the line already holds.
pub fn error_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[derive(Debug, thiserror::Error)]
    #[error("could not open {path}: {source}")]
    struct Saying {
        path: &'static str,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("reading the key")]
    struct Outer {
        #[source]
        inner: Saying,
    }

    #[test]
    fn each_cause_is_said_once() {
        let err = Outer {
            inner: Saying {
                path: "k",
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            },
        };
        assert_eq!(
            error_text(&err),
            "reading the key: could not open k: entity not found"
        );
    }
}

//! Kluis wire protocol: frames, key-release messages, HPKE sealing and response signatures

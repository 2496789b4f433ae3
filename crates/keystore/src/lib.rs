//! Kluis key store (see docs/dev/issue3-plan.md).

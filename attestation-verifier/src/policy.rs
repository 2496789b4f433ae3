//! Key policy (see docs/dev/issue3-plan.md).

//! Audit log (see docs/dev/issue3-plan.md).

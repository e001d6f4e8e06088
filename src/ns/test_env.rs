//! The skip rule of the library's namespace unit tests, in one place (the
//! integration tests in `tests/common` apply the same rule): outside CI a
//! test whose prerequisite is missing prints why and returns; in CI
//! (`CI=true` or `CI=1`) it fails instead.

/// Whether the environment demands that these tests run.
pub(crate) fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips (returns false) when a prerequisite is missing outside CI.
pub(crate) fn require(ok: bool, why: &str) -> bool {
    if !ok {
        assert!(!in_ci(), "CI=true but {why}");
        eprintln!("skipping: {why}");
    }
    ok
}

//! Known middlebox defaults (one data file) and matching an estimate to them.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Middlebox {
    pub name: String,
    pub idle_timeout_seconds: f64,
    pub at_expiry: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    middlebox: Vec<Middlebox>,
}

#[derive(Debug, thiserror::Error)]
#[error("parsing the middlebox table {origin}: {source}")]
pub struct TableError {
    origin: String,
    #[source]
    source: toml::de::Error,
}

/// The table shipped with the agent.
pub const BUILTIN: &str = include_str!("../../data/middleboxes.toml");

pub fn parse_table(text: &str, origin: &str) -> Result<Vec<Middlebox>, TableError> {
    toml::from_str::<Table>(text)
        .map(|t| t.middlebox)
        .map_err(|source| TableError {
            origin: origin.to_string(),
            source,
        })
}

pub fn builtin() -> Vec<Middlebox> {
    // The built-in table is checked by a unit test; an empty list is the safe fallback.
    parse_table(BUILTIN, "built in").unwrap_or_default()
}

/// Middleboxes whose default lies within `tol` (relative) of `seconds`.
pub fn near(table: &[Middlebox], seconds: f64, tol: f64) -> Vec<&Middlebox> {
    table
        .iter()
        .filter(|m| (m.idle_timeout_seconds - seconds).abs() <= tol * m.idle_timeout_seconds)
        .collect()
}

/// Middleboxes whose default lies in the bracket (low, high].
pub fn within(table: &[Middlebox], low: f64, high: f64) -> Vec<&Middlebox> {
    table
        .iter()
        .filter(|m| m.idle_timeout_seconds > low && m.idle_timeout_seconds <= high)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_table_parses_with_the_documented_defaults() {
        let t = parse_table(BUILTIN, "built in").unwrap();
        let secs: Vec<f64> = t.iter().map(|m| m.idle_timeout_seconds).collect();
        for expected in [120.0, 240.0, 300.0, 350.0, 60.0, 1200.0, 3600.0] {
            assert!(secs.contains(&expected), "{expected} missing");
        }
    }

    #[test]
    fn an_estimate_near_a_default_names_it_and_a_scaled_one_names_nothing() {
        let t = builtin();
        let names: Vec<_> = near(&t, 298.0, 0.05)
            .iter()
            .map(|m| m.name.clone())
            .collect();
        assert_eq!(names, ["F5 BIG-IP FastL4"]);
        assert!(near(&t, 20.0, 0.05).is_empty());
    }

    #[test]
    fn unknown_keys_in_the_table_are_rejected() {
        let e = parse_table(
            "[[middlebox]]\nname='x'\nidle_timeout_seconds=1\nat_expiry='y'\ncolour=1\n",
            "test",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("colour"), "{e}");
    }
}

//! The jobs list's filters, parsed from the query string (`state` repeatable or
//! comma-separated, `label=key` or `label=key=value`, `age` such as `1h`, `limit`), with
//! errors that name the parameter and say what it accepts.

use std::time::Duration;

use agentq_core::record::EpochMillis;
use agentq_core::state::ALL_STATES;
use agentq_core::{JobRecord, JobState};

/// The choices the age selector offers (any humantime duration is accepted in the URL).
pub const AGE_CHOICES: &[(&str, u64)] = &[
    ("15m", 900),
    ("1h", 3_600),
    ("6h", 21_600),
    ("24h", 86_400),
    ("7d", 604_800),
];
/// Most rows shown.
pub const MAX_LIMIT: usize = 500;
/// Default rows shown.
pub const DEFAULT_LIMIT: usize = 100;
/// With a label or age filter, this many of the most recently changed jobs are read and
/// filtered (the table's index is by state and change time only).
pub const SCAN_WINDOW: usize = 1_000;

/// What the list shows.
#[derive(Debug, Clone, PartialEq)]
pub struct ListFilter {
    /// Empty: every state.
    pub states: Vec<JobState>,
    /// `key`, or `key` with a value that must match exactly.
    pub label: Option<(String, Option<String>)>,
    /// Only jobs changed within this long.
    pub age: Option<Duration>,
    /// The age as given, for the form.
    pub age_text: Option<String>,
    pub limit: usize,
}

impl Default for ListFilter {
    fn default() -> Self {
        Self {
            states: Vec::new(),
            label: None,
            age: None,
            age_text: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

impl ListFilter {
    /// Parses a raw query string; the error names the parameter and the fix.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut f = Self::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let v = v.trim();
            match k.as_ref() {
                "state" => {
                    for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        let st: JobState = s.parse().map_err(|_| {
                            format!(
                                "state: {s:?} is not a job state; use one of {}",
                                ALL_STATES.map(JobState::as_str).join(", ")
                            )
                        })?;
                        if !f.states.contains(&st) {
                            f.states.push(st);
                        }
                    }
                }
                "label" if v.is_empty() => {}
                "label" => {
                    f.label = Some(match v.split_once('=') {
                        Some((key, val)) if !key.is_empty() => {
                            (key.to_owned(), Some(val.to_owned()))
                        }
                        Some(_) => {
                            return Err(format!("label: {v:?} has no key; use key=value or key"));
                        }
                        None => (v.to_owned(), None),
                    });
                }
                "age" if v.is_empty() => {}
                "age" => {
                    let d = humantime::parse_duration(v).map_err(|e| {
                        format!("age: {v:?} is not a duration ({e}); use e.g. 15m, 1h, 7d")
                    })?;
                    f.age = Some(d);
                    f.age_text = Some(v.to_owned());
                }
                "limit" if v.is_empty() => {}
                "limit" => {
                    f.limit = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            format!("limit: {v:?} is not a number from 1 to {MAX_LIMIT}")
                        })?;
                }
                // Other parameters (a cache-buster, say) are ignored.
                _ => {}
            }
        }
        Ok(f)
    }

    /// Whether filters apply that the table's index cannot (label, age).
    pub fn narrows(&self) -> bool {
        self.label.is_some() || self.age.is_some()
    }

    /// How many records to read before filtering.
    pub fn window(&self) -> usize {
        if self.narrows() {
            SCAN_WINDOW.max(self.limit)
        } else {
            self.limit
        }
    }

    /// The label filter as typed.
    pub fn label_text(&self) -> Option<String> {
        self.label.as_ref().map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => k.clone(),
        })
    }

    pub fn matches(&self, rec: &JobRecord, now: EpochMillis) -> bool {
        let label_ok = match &self.label {
            None => true,
            Some((k, None)) => rec.labels.contains_key(k),
            Some((k, Some(v))) => rec.labels.get(k) == Some(v),
        };
        let age_ok = self
            .age
            .is_none_or(|a| rec.updated_at >= now - a.as_millis() as i64);
        label_ok && age_ok
    }

    /// Filters `records` (newest change first) and keeps at most `limit`.
    pub fn apply(&self, records: Vec<JobRecord>, now: EpochMillis) -> Vec<JobRecord> {
        records
            .into_iter()
            .filter(|r| self.matches(r, now))
            .take(self.limit)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentq_core::JobId;

    #[test]
    fn parses_the_form() {
        let f = ListFilter::parse(
            "state=RUNNING&state=queued,DEAD&label=team%3Dinfra&age=1h&limit=20&_=1",
        )
        .unwrap();
        assert_eq!(
            f.states,
            vec![JobState::Running, JobState::Queued, JobState::Dead]
        );
        assert_eq!(f.label, Some(("team".into(), Some("infra".into()))));
        assert_eq!(f.age, Some(Duration::from_secs(3600)));
        assert_eq!(f.limit, 20);
        assert_eq!(ListFilter::parse("").unwrap(), ListFilter::default());
        assert_eq!(
            ListFilter::parse("label=&age=&limit=").unwrap(),
            ListFilter::default()
        );
    }

    #[test]
    fn bad_values_name_the_parameter() {
        for (q, field) in [
            ("state=SLEEPING", "state:"),
            ("age=soon", "age:"),
            ("limit=0", "limit:"),
            ("limit=9999", "limit:"),
            ("label==x", "label:"),
        ] {
            let e = ListFilter::parse(q).unwrap_err();
            assert!(e.starts_with(field), "{q}: {e}");
        }
    }

    #[test]
    fn label_and_age_match() {
        let mut r = JobRecord::new(JobId::parse("j").unwrap(), JobState::Queued, 10_000);
        r.labels.insert("team".into(), "infra".into());
        let now = 10_000 + 3_600_000;
        let f = ListFilter::parse("label=team").unwrap();
        assert!(f.matches(&r, now));
        assert!(
            !ListFilter::parse("label=team=web")
                .unwrap()
                .matches(&r, now)
        );
        assert!(ListFilter::parse("age=1h").unwrap().matches(&r, now));
        assert!(!ListFilter::parse("age=59m").unwrap().matches(&r, now));
    }
}

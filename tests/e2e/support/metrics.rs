//! The one reader of a Prometheus text exposition (`GET /metrics`) in the tests.

use std::collections::BTreeMap;
use std::fmt;

/// One sample: `name{labels} value`.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape, with its text kept for promtool and for failure messages.
pub struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    pub fn parse(text: String) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Scrape { text, samples }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Every sample of metric `name` (exact, e.g. `keyrotd_invalidation_window_seconds_count`).
    pub fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> Vec<&'a Sample> {
        self.samples(name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the one sample of `name` whose labels include every pair of `labels`; `None`
    /// when there is none. Panics when several match: a test names its series exactly.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found = self.matching(name, labels);
        assert!(
            found.len() <= 1,
            "{name}{labels:?} matches {} series: {found:?}",
            found.len()
        );
        found.first().map(|s| s.value)
    }

    /// Like [`Scrape::value`], but the series must exist.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in /metrics:\n{}", self.text))
    }

    /// The sum over every sample of `name` whose labels include `labels`; 0 when none does.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).iter().map(|s| s.value).sum()
    }
}

impl fmt::Display for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `name{a="x",b="y\"z"} 1.5` (label values may hold escaped quotes, backslashes and commas).
fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.trim_end().rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let Some((name, rest)) = series.split_once('{') else {
        return Some(Sample {
            name: series.to_string(),
            labels: BTreeMap::new(),
            value,
        });
    };
    let body = rest.strip_suffix('}')?;
    Some(Sample {
        name: name.to_string(),
        labels: parse_labels(body)?,
        value,
    })
}

fn parse_labels(mut body: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    loop {
        body = body.trim_start_matches(',').trim_start();
        if body.is_empty() {
            return Some(labels);
        }
        let (key, rest) = body.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_string(), value);
        body = &rest[end + 1..];
    }
}

#[test]
fn the_parser_reads_escaped_label_values_and_special_numbers() {
    let s = Scrape::parse(
        "# HELP x y\nm{a=\"1,2\",b=\"q\\\"uote\"} 3\nm{a=\"x\"} +Inf\nplain 0.5\n".into(),
    );
    assert_eq!(s.get("m", &[("a", "1,2"), ("b", "q\"uote")]), 3.0);
    assert_eq!(s.get("m", &[("a", "x")]), f64::INFINITY);
    assert_eq!(s.get("plain", &[]), 0.5);
    assert_eq!(s.sum("m", &[]), f64::INFINITY);
    assert_eq!(s.value("absent", &[]), None);
}

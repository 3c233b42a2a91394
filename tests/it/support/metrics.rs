//! Reading the agent's HTTP listener as Prometheus and a supervisor do: `GET` a path,
//! and `/metrics` parsed with a Prometheus text parser (plus a check of every sample
//! line's shape and HELP, since the parser is lenient).
//!
//! `support::metrics` in the tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};

use super::wait;

/// `GET http://addr/path`: status and body.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::get(format!("http://{addr}{path}"))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    })
}

/// One scrape, parsed.
pub struct Metrics {
    pub text: String,
    pub scrape: Scrape,
}

impl Metrics {
    pub fn read(addr: SocketAddr) -> Metrics {
        let (status, text) = get(addr, "/metrics");
        assert_eq!(status, 200, "GET /metrics: {text}");
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .unwrap_or_else(|e| panic!("the metrics do not parse: {e}\n{text}"));
        // The parser is lenient: check the shape of every sample line too.
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let value = line.rsplit(' ').next().unwrap();
            assert!(
                value.parse::<f64>().is_ok() || value == "+Inf" || value == "NaN",
                "not a sample line: {line}"
            );
        }
        for s in &scrape.samples {
            let base = s
                .metric
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                scrape.docs.contains_key(&s.metric) || scrape.docs.contains_key(base),
                "{} has no HELP line\n{text}",
                s.metric
            );
        }
        Metrics { text, scrape }
    }

    /// The value of the sample `name` whose labels include `labels`; `None` if absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
                Value::Histogram(h) => h.last().map_or(0.0, |b| b.count),
                Value::Summary(_) => f64::NAN,
            })
    }

    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", self.text))
    }

    /// The type the exposition declares for `name`.
    pub fn kind_of(&self, name: &str) -> &'static str {
        match self.scrape.samples.iter().find(|s| s.metric == name) {
            Some(s) => match s.value {
                Value::Counter(_) => "counter",
                Value::Gauge(_) => "gauge",
                Value::Histogram(_) => "histogram",
                Value::Summary(_) => "summary",
                Value::Untyped(_) => "untyped",
            },
            None => panic!("no {name} in\n{}", self.text),
        }
    }
}

/// Scrapes until `pred` holds; panics after `timeout` with the last scrape.
#[track_caller]
pub fn wait_for(
    addr: SocketAddr,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let mut last = String::new();
    let found = wait::wait_for(timeout, what, || {
        let m = Metrics::read(addr);
        if pred(&m) {
            return Some(m);
        }
        last = m.text;
        None
    });
    found.unwrap_or_else(|_| panic!("the metrics never showed {what}:\n{last}"))
}

//! Helpers to register metrics in the context's registry. Every metric is
//! named `pgshift_…`, carries a help text and its unit in its name.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

fn check(name: &str) {
    debug_assert!(
        name.starts_with("pgshift_"),
        "metric {name} must start with pgshift_"
    );
}

pub(crate) fn int_gauge(reg: &Registry, name: &str, help: &str) -> IntGauge {
    check(name);
    let m = IntGauge::new(name, help).expect("valid metric");
    reg.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

/// An integer gauge with constant labels that describes the latest run of
/// something that runs again (a verification of one database): registering
/// the same name and labels again replaces the earlier gauge instead of
/// failing, so the registry shows the latest run's value.
pub(crate) fn int_gauge_latest(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[(&str, &str)],
) -> IntGauge {
    check(name);
    let opts = labels.iter().fold(Opts::new(name, help), |o, (k, v)| {
        o.const_label(k.to_string(), v.to_string())
    });
    let m = IntGauge::with_opts(opts).expect("valid metric");
    match reg.register(Box::new(m.clone())) {
        Ok(()) => {}
        Err(prometheus::Error::AlreadyReg) => {
            // Unregistering matches by description, which the new gauge shares.
            let _ = reg.unregister(Box::new(m.clone()));
            if let Err(e) = reg.register(Box::new(m.clone())) {
                // Two runs replacing each other at the same instant: this
                // one's value goes unexported, no reason to fail the run.
                tracing::debug!("metric {name} not registered: {e}");
            }
        }
        Err(e) => panic!("metric {name} conflicts with another of its name: {e}"),
    }
    m
}

pub(crate) fn int_gauge_vec(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> IntGaugeVec {
    check(name);
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

pub(crate) fn gauge(reg: &Registry, name: &str, help: &str) -> Gauge {
    check(name);
    let m = Gauge::new(name, help).expect("valid metric");
    reg.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

pub(crate) fn gauge_vec(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    check(name);
    let m = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

pub(crate) fn int_counter(reg: &Registry, name: &str, help: &str) -> IntCounter {
    check(name);
    let m = IntCounter::new(name, help).expect("valid metric");
    reg.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

pub(crate) fn int_counter_vec(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> IntCounterVec {
    check(name);
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

pub(crate) fn histogram(reg: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    check(name);
    let m = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    reg.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

pub fn histogram_vec(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    check(name);
    let m = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    reg.register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

/// Renders the registry in the Prometheus text format.
pub fn render(reg: &Registry) -> Result<String, prometheus::Error> {
    let mut buf = Vec::new();
    TextEncoder::new().encode(&reg.gather(), &mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

//! `connector check-config`: the effective configuration as TOML. Secrets are masked.

use std::fmt::Write;

use super::{Config, Flavor};
use crate::jobs;
use crate::queue::OnExhausted;

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn d(d: std::time::Duration) -> String {
    q(&humantime::format_duration(d).to_string())
}

/// Renders the effective configuration. Every secret prints as `"***"` (or is absent).
/// The keys set by environment variables are listed at the end, as comments.
pub fn render(cfg: &Config) -> String {
    let mut o = String::new();
    // Writing to a String cannot fail.
    let _ = render_into(cfg, &mut o);
    if !cfg.env_sources.is_empty() {
        o.push_str("\n# set by environment variables:\n");
        for (key, var) in &cfg.env_sources {
            let _ = writeln!(o, "#   {key} <- {var}");
        }
    }
    o
}

/// `check-config --json`: the same values as [`render`] (secrets `"***"`), as JSON,
/// with `"env"`: which variable set which key.
pub fn render_json(cfg: &Config) -> String {
    let mut o = String::new();
    let _ = render_into(cfg, &mut o);
    // Our own TOML, so it parses; an error would be a bug shown as such, not a panic.
    let mut v = match toml::from_str::<toml::Table>(&o) {
        Ok(t) => serde_json::to_value(t).unwrap_or_default(),
        Err(e) => serde_json::json!({"error": format!("rendering the configuration: {e}")}),
    };
    v["env"] = serde_json::to_value(&cfg.env_sources).unwrap_or_default();
    v["warnings"] = serde_json::to_value(&cfg.warnings).unwrap_or_default();
    let mut text = serde_json::to_string_pretty(&v).unwrap_or_default();
    text.push('\n');
    text
}

fn render_into(cfg: &Config, o: &mut String) -> std::fmt::Result {
    match &cfg.file {
        Some(f) => writeln!(
            o,
            "# effective configuration: {} + environment",
            f.display()
        )?,
        None => writeln!(
            o,
            "# effective configuration: defaults + environment (no file)"
        )?,
    }
    writeln!(o, "data_dir = {}", q(&cfg.data_dir.display().to_string()))?;
    writeln!(o, "shutdown_timeout = {}", d(cfg.shutdown_timeout))?;
    writeln!(
        o,
        "\n[admin]\nsocket = {}",
        q(&cfg.admin_socket().display().to_string())
    )?;

    writeln!(
        o,
        "\n[panel]\nbase_url = {}",
        q(&super::ShownUrl(&cfg.panel.base_url).to_string())
    )?;
    match (
        &cfg.panel.internal_api_key,
        &cfg.panel.internal_api_key_file,
    ) {
        (Some(_), Some(f)) => {
            writeln!(o, "internal_api_key_file = {}", q(&f.display().to_string()))?
        }
        (Some(_), None) => writeln!(o, "internal_api_key = \"***\"")?,
        (None, _) => writeln!(o, "# internal_api_key is not set")?,
    }
    writeln!(o, "timeout = {}", d(cfg.panel.timeout))?;

    writeln!(
        o,
        "\n[sync]\ninterval = {}\noutput_dir = {}\nmax_removal_ratio = {}\nconfirm_after = {}",
        d(cfg.sync.interval),
        q(&cfg.sync.output_dir.display().to_string()),
        cfg.sync.max_removal_ratio,
        d(cfg.sync.confirm_after)
    )?;

    writeln!(
        o,
        "\n[apply]\nmode = {}\ncmd = {}\ntimeout = {}",
        q(cfg.apply.mode.as_str()),
        q(&cfg.apply.cmd),
        d(cfg.apply.timeout)
    )?;

    if let Some(x) = &cfg.xray {
        writeln!(
            o,
            "\n[xray]\napi = {}\nflavor = {}\nemail_template = {}\ntimeout = {}\nconcurrency = {}",
            q(&x.api),
            q(match x.flavor {
                Flavor::Xray => "xray",
                Flavor::V2ray => "v2ray",
            }),
            q(&x.email_template),
            d(x.timeout),
            x.concurrency
        )?;
        writeln!(
            o,
            "access_log = {}\ncut_connections = {}",
            q(&x.access_log
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()),
            x.cut_connections
        )?;
    }
    for n in &cfg.nodes {
        writeln!(
            o,
            "\n[[nodes]]\nid = {}\ninbound_tag = {}\nprotocol = {}\nflow = {}",
            n.id,
            q(&n.inbound_tag),
            q(n.protocol.as_str()),
            q(&n.flow)
        )?;
        if let Some(c) = n.cipher {
            writeln!(o, "cipher = {}", q(c.as_str()))?;
        }
        if let Some(p) = n.port {
            writeln!(o, "port = {p}")?;
        }
    }
    writeln!(
        o,
        "\n[traffic]\nenabled = {}\ninterval = {}\nmax_items = {}",
        cfg.traffic.enabled,
        d(cfg.traffic.interval),
        cfg.traffic.max_items
    )?;

    super::webhook::render(&cfg.webhook, &cfg.http, o)?;
    writeln!(
        o,
        "\n[queue]\ndedupe_window = {}",
        d(cfg.queue.dedupe_window)
    )?;
    for kind in jobs::ALL {
        let k = cfg.queue.kind(kind);
        let ladder: Vec<String> = k.ladder.iter().map(|r| d(*r)).collect();
        writeln!(
            o,
            "\n[queue.kinds.{kind}]\nladder = [{}]\non_exhausted = {}\nconcurrency = {}\nlease_ahead = {}\nlease_timeout = {}\nkeep_done = {}",
            ladder.join(", "),
            q(match k.on_exhausted {
                OnExhausted::Dead => "dead",
                OnExhausted::RepeatLast => "repeat-last",
            }),
            k.concurrency,
            k.lease_ahead,
            d(k.lease_timeout),
            d(k.keep_done.unwrap_or(cfg.queue.dedupe_window))
        )?;
    }
    Ok(())
}

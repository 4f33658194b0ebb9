//! The `http` and `command` providers: a code goes out through the operator's SMS or
//! voice gateway.
//!
//! Neither ever logs the request it makes: its URL, body or arguments hold the code.
//! A failure is described by what went wrong (a status, an exit code, a timeout) and
//! the gateway's host or program name only.

use std::time::Duration;

use base64::Engine;

use super::provider::{Delivery, DeliveryError, DeliveryFuture, Provider};
use crate::config::{CommandProvider, HttpBody, HttpProvider};

/// Fills the placeholders of `template`, passing each value through `escape`.
fn fill(template: &str, d: &Delivery, escape: impl Fn(&str) -> String) -> String {
    template
        .replace("{number}", &escape(d.number.as_str()))
        .replace("{code}", &escape(&d.code))
        .replace("{message}", &escape(&d.message))
        .replace("{channel}", &escape(d.channel.name()))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A JSON string's contents, escaped (without the quotes).
fn json_escape(value: &str) -> String {
    let quoted = serde_json::Value::String(value.to_string()).to_string();
    quoted[1..quoted.len() - 1].to_string()
}

/// The host of a URL, for messages that must not show the rest of it.
fn host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    authority.rsplit('@').next().unwrap_or(authority)
}

/// Delivers codes with an HTTP request.
/// Cheap to clone: each delivery moves a clone onto the blocking pool.
#[derive(Clone)]
pub struct HttpGateway {
    config: std::sync::Arc<HttpProvider>,
    agent: ureq::Agent,
}

impl HttpGateway {
    pub fn new(config: HttpProvider) -> HttpGateway {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        HttpGateway {
            config: std::sync::Arc::new(config),
            agent,
        }
    }

    fn send(&self, d: &Delivery) -> Result<(), DeliveryError> {
        let c = &self.config;
        let url = fill(&c.url, d, percent_encode);
        let failed =
            |what: String| DeliveryError(format!("{} ({}): {what}", host(&c.url), c.method));
        let mut headers: Vec<(String, String)> = c
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), fill(v, d, str::to_string)))
            .collect();
        if let Some((user, password)) = &c.basic_auth {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            headers.push(("Authorization".into(), format!("Basic {token}")));
        }
        let result = match (c.method.as_str(), &c.body) {
            ("GET", _) => {
                let mut req = self.agent.get(&url);
                for (k, v) in &headers {
                    req = req.header(k, v);
                }
                req.call()
            }
            (method, body) => {
                let mut req = if method == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                for (k, v) in &headers {
                    req = req.header(k, v);
                }
                match body {
                    HttpBody::None => req.send_empty(),
                    HttpBody::Form(fields) => {
                        let filled: Vec<(String, String)> = fields
                            .iter()
                            .map(|(k, v)| (k.clone(), fill(v, d, str::to_string)))
                            .collect();
                        req.send_form(filled.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    }
                    HttpBody::Json(template) => req
                        .content_type("application/json")
                        .send(fill(template, d, json_escape).as_bytes()),
                }
            }
        };
        let status = result
            .map_err(|e| failed(format!("request failed: {}", describe(&e))))?
            .status()
            .as_u16();
        let ok = if c.success_status.is_empty() {
            (200..300).contains(&status)
        } else {
            c.success_status.contains(&status)
        };
        if ok {
            Ok(())
        } else {
            Err(failed(format!("answered HTTP {status}")))
        }
    }
}

/// An error of ureq, without the URL it may carry.
fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(_) => "timed out".into(),
        ureq::Error::Io(io) => io.kind().to_string(),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => "TLS failed".into(),
        _ => "protocol error".into(),
    }
}

impl Provider for HttpGateway {
    fn name(&self) -> &'static str {
        "http"
    }

    fn deliver<'a>(&'a self, d: &'a Delivery) -> DeliveryFuture<'a> {
        Box::pin(async move {
            let (gateway, d) = (self.clone(), d.clone());
            tokio::task::spawn_blocking(move || gateway.send(&d))
                .await
                .map_err(|e| DeliveryError(format!("http delivery task failed: {e}")))?
        })
    }
}

/// Delivers codes by running a program.
pub struct CommandGateway {
    config: CommandProvider,
}

impl CommandGateway {
    pub fn new(config: CommandProvider) -> CommandGateway {
        CommandGateway { config }
    }
}

impl Provider for CommandGateway {
    fn name(&self) -> &'static str {
        "command"
    }

    fn deliver<'a>(&'a self, d: &'a Delivery) -> DeliveryFuture<'a> {
        Box::pin(async move {
            let c = &self.config;
            let name = std::path::Path::new(&c.program)
                .file_name()
                .map_or(c.program.clone(), |n| n.to_string_lossy().into_owned());
            let failed = |what: String| DeliveryError(format!("{name}: {what}"));
            let mut child = tokio::process::Command::new(&c.program)
                .args(c.args.iter().map(|a| fill(a, d, str::to_string)))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| failed(format!("cannot start: {}", e.kind())))?;
            match tokio::time::timeout(c.timeout, child.wait()).await {
                Ok(Ok(status)) if status.success() => Ok(()),
                Ok(Ok(status)) => Err(failed(format!("exited with {status}"))),
                Ok(Err(e)) => Err(failed(format!("wait failed: {}", e.kind()))),
                Err(_) => {
                    let _ = child.kill().await;
                    Err(failed(format!(
                        "no answer within {}",
                        humantime::format_duration(c.timeout)
                    )))
                }
            }
        })
    }
}

/// Tries a provider again after a failure, waiting 500 ms, 1 s, 2 s… between tries.
/// Every failure is logged (without the code); the last one is returned.
pub async fn deliver_with_retries(
    provider: &dyn Provider,
    d: &Delivery,
    retries: u32,
) -> Result<(), DeliveryError> {
    let mut wait = Duration::from_millis(500);
    let mut attempt = 0;
    loop {
        match provider.deliver(d).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < retries => {
                attempt += 1;
                tracing::warn!(
                    provider = provider.name(),
                    attempt,
                    error = %e,
                    "code delivery failed; trying again"
                );
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_escaped_for_where_they_go() {
        assert_eq!(percent_encode("+1 415/ä"), "%2B1%20415%2F%C3%A4");
        assert_eq!(json_escape("a \"b\"\n"), "a \\\"b\\\"\\n");
        assert_eq!(
            host("https://user:pw@api.example.com:8443/x?code=1"),
            "api.example.com:8443"
        );
        assert_eq!(host("http://127.0.0.1:9/message"), "127.0.0.1:9");
    }
}

//! Verification codes through real gateways: an HTTP server and a program, both local.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard::client::Client;
use switchboard::proto::{Channel, ErrorKind};
use switchboard::tls::Credentials;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// One request the gateway received.
#[derive(Debug, Clone)]
struct Captured {
    request_line: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Captured {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 server on 127.0.0.1 that records requests and answers `status`.
struct Gateway {
    addr: String,
    seen: Arc<Mutex<Vec<Captured>>>,
}

impl Gateway {
    async fn start(status: u16) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Read the head, then as much body as Content-Length says.
                    let (head_end, length) = loop {
                        let Ok(n) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_string();
                            let length = head
                                .lines()
                                .find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            break (end + 4, length);
                        }
                    };
                    while buf.len() < head_end + length {
                        let Ok(n) = sock.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let mut lines = head.lines();
                    let request_line = lines.next().unwrap_or("").to_string();
                    let headers = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                        .collect();
                    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
                    log.lock().unwrap().push(Captured {
                        request_line,
                        headers,
                        body,
                    });
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = sock.write_all(reply.as_bytes()).await;
                });
            }
        });
        Gateway { addr, seen }
    }

    /// The requests so far, waiting (bounded) until there are at least `n`.
    async fn wait_for(&self, n: usize) -> Vec<Captured> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seen = self.seen.lock().unwrap().clone();
            if seen.len() >= n || Instant::now() > deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The six digits after "code is " in `text`.
fn code_in(text: &str) -> String {
    let at = text.find("code is ").expect("a code in the message") + "code is ".len();
    text[at..at + 6].to_string()
}

const NEW_NUMBER: &str = "+14155550123";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_posts_the_code_to_an_http_gateway_and_that_code_verifies() {
    let gateway = Gateway::start(200).await;
    let config = format!(
        "[verification.sms]\nkind = \"http\"\nurl = \"http://{}/message\"\nusername = \"sms\"\n\
         password = \"pw\"\njson = '{{\"message\": \"{{message}}\", \"phoneNumbers\": [\"{{number}}\"]}}'\n",
        gateway.addr
    );
    let node = ProcessNode::start(&config);
    let home = node.dir.path().join("dave");
    // `register` asks for the code on stdin once the node has sent it.
    let mut child = Command::new(BIN)
        .args(["--home", home.to_str().unwrap()])
        .args(["register", NEW_NUMBER, "--server", &node.addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = gateway.wait_for(1).await;
    assert_eq!(
        seen.len(),
        1,
        "the gateway got no request\nlog:\n{}",
        node.log()
    );
    let request = &seen[0];
    assert!(
        request.request_line.starts_with("POST /message "),
        "{request:?}"
    );
    assert_eq!(request.header("authorization"), Some("Basic c21zOnB3"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_str(&request.body).unwrap();
    assert_eq!(body["phoneNumbers"][0], NEW_NUMBER);
    let code = code_in(body["message"].as_str().unwrap());
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{code}\n").as_bytes())
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "{}", show(&["register"], &out));
    let out = node.cli(&home, &["whoami"], "");
    assert_eq!(stdout(&out).lines().next(), Some(NEW_NUMBER));
    // With a real gateway the code is in no line of the node's log.
    assert!(!node.log().contains(&code), "the node logged the code");
}

#[tokio::test]
async fn a_command_provider_runs_the_program_with_the_code() {
    let out_dir = tempfile::tempdir().unwrap();
    let file = out_dir.path().join("sent.txt");
    let config = format!(
        "[verification.voice]\nkind = \"command\"\nprogram = \"/bin/sh\"\n\
         args = [\"-c\", \"printf '%s %s %s\\\\n' \\\"$0\\\" \\\"$1\\\" \\\"$2\\\" >> {}\", \"{{number}}\", \"{{channel}}\", \"{{message}}\"]\n",
        file.display()
    );
    let node = InProcessNode::start(&config).await;
    let client = node.connect().await;
    let n = number(NEW_NUMBER);
    client.request_code(&n, Channel::Voice, "en").await.unwrap();
    let written = std::fs::read_to_string(&file).unwrap();
    assert!(
        written.starts_with(&format!("{NEW_NUMBER} voice Your Switchboard code is ")),
        "{written}"
    );
    let code = code_in(&written);
    let reg = client.verify_code(&n, &code).await.unwrap();
    assert_eq!(reg.number, NEW_NUMBER);
    node.shutdown().await;
}

#[tokio::test]
async fn a_failing_gateway_is_retried_then_the_client_hears_only_try_later() {
    let gateway = Gateway::start(500).await;
    let config = format!(
        "[verification]\nretries = 2\n[verification.sms]\nkind = \"http\"\n\
         url = \"http://{}/send?to={{number}}\"\nmethod = \"GET\"\n",
        gateway.addr
    );
    let node = InProcessNode::start(&config).await;
    let client = node.connect().await;
    let err = client
        .request_code(&number(NEW_NUMBER), Channel::Sms, "en")
        .await
        .expect_err("a failing gateway");
    let message = err.to_string();
    assert_eq!(kind(Err::<(), _>(err)), ErrorKind::DeliveryFailed);
    assert!(
        message.contains("could not send the code; try again later"),
        "{message}"
    );
    assert!(
        !message.contains("500") && !message.contains("127.0.0.1"),
        "{message}"
    );
    let seen = gateway.wait_for(3).await;
    assert_eq!(seen.len(), 3, "one try and two retries");
    assert!(
        seen[0]
            .request_line
            .starts_with("GET /send?to=%2B14155550123 "),
        "{:?}",
        seen[0]
    );
    // Nothing is pending: the client may ask again at once (no cooldown).
    let again = client
        .request_code(&number(NEW_NUMBER), Channel::Sms, "en")
        .await;
    assert_eq!(kind(again), ErrorKind::DeliveryFailed);
    node.shutdown().await;
}

#[tokio::test]
async fn the_message_is_in_the_clients_language() {
    let gateway = Gateway::start(200).await;
    let config = format!(
        "[verification.messages]\nde = \"Dein Code lautet {{code}}.\"\n\
         [verification.sms]\nkind = \"http\"\nurl = \"http://{}/m\"\nform = {{ To = \"{{number}}\", Body = \"{{message}}\" }}\n",
        gateway.addr
    );
    let node = InProcessNode::start(&config).await;
    let (creds, _) = Credentials::generate_device().unwrap();
    let client = Client::connect(&node.addr, &creds, Some(node.fingerprint))
        .await
        .unwrap();
    client
        .request_code(&number(NEW_NUMBER), Channel::Sms, "de-AT")
        .await
        .unwrap();
    let seen = gateway.wait_for(1).await;
    assert_eq!(
        seen[0].header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert!(
        seen[0].body.contains("To=%2B14155550123"),
        "{}",
        seen[0].body
    );
    assert!(
        seen[0].body.contains("Body=Dein+Code+lautet+"),
        "{}",
        seen[0].body
    );
    node.shutdown().await;
}

async fn ask(client: &Client, n: &str) -> Result<(), String> {
    client
        .request_code(&number(n), Channel::Sms, "en")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fourth_code_in_ten_minutes_is_refused_even_after_a_restart() {
    let mut node = ProcessNode::start("[verification]\nresend_cooldown_secs = 0\n");
    let (creds, _) = Credentials::generate_device().unwrap();
    let client = Client::connect(&node.addr, &creds, Some(node.fingerprint))
        .await
        .unwrap();
    for _ in 0..3 {
        ask(&client, NEW_NUMBER).await.unwrap();
    }
    let refused = ask(&client, NEW_NUMBER).await.unwrap_err();
    assert!(
        refused.contains("at most 3 codes per number in 10 minutes; try again in 9m"),
        "{refused}"
    );
    client.close().await;
    node = tokio::task::spawn_blocking(move || {
        node.restart();
        node
    })
    .await
    .unwrap();
    let client = Client::connect(&node.addr, &creds, Some(node.fingerprint))
        .await
        .unwrap();
    let refused = ask(&client, NEW_NUMBER).await.unwrap_err();
    assert!(
        refused.contains("at most 3 codes per number in 10 minutes"),
        "after a restart: {refused}"
    );
    // Another number is not held back by this one.
    ask(&client, "+14155550124").await.unwrap();
}

#[tokio::test]
async fn address_country_and_global_limits_name_themselves() {
    let node = InProcessNode::start(
        "[verification]\nresend_cooldown_secs = 0\n[verification.limits]\nper_address_hour = 4\n\
         denied_countries = [44]\n",
    )
    .await;
    let client = node.connect().await;
    for i in 0..4 {
        client
            .request_code(&number(&format!("+1415555013{i}")), Channel::Sms, "en")
            .await
            .unwrap();
    }
    let refused = client
        .request_code(&number("+14155550139"), Channel::Sms, "en")
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("at most 4 code requests per hour from one address"),
        "{refused}"
    );
    assert!(matches!(
        kind(Err::<(), _>(refused)),
        ErrorKind::RateLimited { retry_after_secs } if retry_after_secs > 3000
    ));
    let uk = client
        .request_code(&number("+442079460958"), Channel::Sms, "en")
        .await
        .unwrap_err();
    assert!(
        uk.to_string()
            .contains("does not send codes to +44 numbers"),
        "{uk}"
    );
    node.shutdown().await;

    let node = InProcessNode::start("[verification.limits]\nper_country_day = 1\n").await;
    let client = node.connect().await;
    client
        .request_code(&number("+14155550131"), Channel::Sms, "en")
        .await
        .unwrap();
    let us = client
        .request_code(&number("+14155550132"), Channel::Sms, "en")
        .await
        .unwrap_err();
    assert!(
        us.to_string()
            .contains("at most 1 codes a day go to this country"),
        "{us}"
    );
    client
        .request_code(&number("+442079460958"), Channel::Sms, "en")
        .await
        .expect("another country has its own count");
    node.shutdown().await;

    let node = InProcessNode::start("[verification.limits]\nglobal_day = 2\n").await;
    let client = node.connect().await;
    for n in ["+14155550131", "+14155550132"] {
        client
            .request_code(&number(n), Channel::Sms, "en")
            .await
            .unwrap();
    }
    let spent = client
        .request_code(&number("+14155550133"), Channel::Sms, "en")
        .await
        .unwrap_err();
    assert!(
        spent
            .to_string()
            .contains("budget of 2 codes a day is spent"),
        "{spent}"
    );
    node.shutdown().await;
}

//! A local HTTP receiver that records every request: the stand-in for an OpenTelemetry
//! collector (`POST /v1/traces`) and for a webhook endpoint. It runs on its own thread and
//! runtime, so it answers whatever the test does meanwhile (blocking waits included), and
//! can be told to fail the next requests (to exercise retries).
//!
//! [`verify_standard_webhooks`] checks webhook signatures with Python's `hmac` module: an
//! implementation independent of agentq's, as a receiver in another language would.

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The status it was answered with.
    pub status: u16,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Debug, Default)]
struct State {
    requests: Vec<Recorded>,
    /// Statuses for the next requests (then 200).
    plan: VecDeque<u16>,
}

/// The receiver; stops when dropped (its thread ends with the process).
#[derive(Debug, Clone)]
pub struct HttpSink {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl HttpSink {
    /// Listens on 127.0.0.1 on a free port.
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((conn, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(serve(conn, st.clone()));
                }
            });
        });
        Self { addr, state }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers the next requests with these statuses (then 200 again).
    pub fn fail_next(&self, statuses: &[u16]) {
        self.state.lock().unwrap().plan.extend(statuses);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Waits until `done` holds for the requests so far (polling), or panics after
    /// `timeout` with what arrived.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&[Recorded]) -> bool) -> Vec<Recorded> {
        let start = Instant::now();
        loop {
            let r = self.requests();
            if done(&r) {
                return r;
            }
            if start.elapsed() > timeout {
                let paths: Vec<_> = r.iter().map(|x| (&x.path, x.status)).collect();
                panic!("the expected requests did not arrive within {timeout:?}; got {paths:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

async fn serve(mut conn: tokio::net::TcpStream, state: Arc<Mutex<State>>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Headers.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or_default().split_whitespace();
        let method = first.next().unwrap_or_default().to_owned();
        let path = first.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        buf.drain(..head_end + 4);
        while buf.len() < len {
            let mut chunk = [0u8; 65536];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        let status = {
            let mut s = state.lock().unwrap();
            let status = s.plan.pop_front().unwrap_or(200);
            s.requests.push(Recorded {
                method,
                path,
                headers,
                body,
                status,
            });
            status
        };
        let answer = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
        );
        if conn.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// For each request, whether its `webhook-signature` is valid for `secret` under the
/// Standard Webhooks scheme, checked by Python's `hmac` (not agentq's code).
pub fn verify_standard_webhooks(secret: &str, requests: &[Recorded]) -> Vec<bool> {
    let items: Vec<serde_json::Value> = requests
        .iter()
        .map(|r| {
            serde_json::json!({
                "id": r.header("webhook-id").unwrap_or_default(),
                "ts": r.header("webhook-timestamp").unwrap_or_default(),
                "sig": r.header("webhook-signature").unwrap_or_default(),
                "body": String::from_utf8_lossy(&r.body),
            })
        })
        .collect();
    let script = r#"
import base64, hashlib, hmac, json, sys
secret = sys.argv[1]
key = base64.b64decode(secret[len("whsec_"):]) if secret.startswith("whsec_") else secret.encode()
out = []
for it in json.load(sys.stdin):
    msg = (it["id"] + "." + it["ts"] + "." + it["body"]).encode()
    want = base64.b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode()
    sigs = [s[3:] for s in it["sig"].split() if s.startswith("v1,")]
    out.append(any(hmac.compare_digest(want, s) for s in sigs))
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script, secret])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(serde_json::to_string(&items).expect("json").as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python3 output");
    assert!(out.status.success(), "the signature checker failed");
    serde_json::from_slice(&out.stdout).expect("verdicts")
}

//! A small Lambda Runtime API server (and the Extensions API calls the runtime's
//! graceful-shutdown support makes), following the documented HTTP interface, so the
//! agent's `lambda` front end runs here exactly as under Lambda: it long-polls
//! `/invocation/next`, gets an event with a deadline, and posts a response.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// What the function answered for one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Response(String),
    Error(String),
}

#[derive(Default, Debug)]
struct State {
    pending: VecDeque<(String, String, u64)>,
    answers: HashMap<String, Answer>,
    first_next: Option<Instant>,
    init_error: Option<String>,
}

/// The server; cheap to clone.
#[derive(Clone, Debug)]
pub struct RuntimeApi {
    pub addr: String,
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl RuntimeApi {
    /// Starts listening on 127.0.0.1 (random port).
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let api = Self {
            addr,
            state: Arc::default(),
            notify: Arc::default(),
        };
        let a = api.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(a.clone().serve(sock));
            }
        });
        api
    }

    /// Queues an invocation with `timeout` to its deadline; returns its request id.
    pub fn invoke(&self, event: &str, timeout: Duration) -> String {
        let id = format!("req-{}", ulid::Ulid::new());
        let deadline = SystemTime::now()
            .checked_add(timeout)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        self.state.lock().expect("state").pending.push_back((
            id.clone(),
            event.to_owned(),
            deadline,
        ));
        self.notify.notify_waiters();
        id
    }

    /// Waits for the function's answer to `id`.
    pub async fn answer(&self, id: &str, within: Duration) -> Option<Answer> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(a) = self.state.lock().expect("state").answers.get(id).cloned() {
                return Some(a);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// When the function first asked for work.
    pub fn first_next(&self) -> Option<Instant> {
        self.state.lock().expect("state").first_next
    }

    pub fn init_error(&self) -> Option<String> {
        self.state.lock().expect("state").init_error.clone()
    }

    async fn serve(self, sock: TcpStream) {
        let (r, mut w) = sock.into_split();
        let mut r = BufReader::new(r);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_owned();
            let path = parts.next().unwrap_or_default().to_owned();
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                    return;
                }
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).await.is_err() {
                return;
            }
            let body = String::from_utf8_lossy(&body).into_owned();
            let reply = self.route(&method, &path, body).await;
            if w.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    async fn route(&self, method: &str, path: &str, body: String) -> String {
        let ok = |status: &str, headers: &str, body: &str| {
            format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n{body}",
                body.len()
            )
        };
        match (method, path) {
            ("GET", "/2018-06-01/runtime/invocation/next") => {
                {
                    let mut s = self.state.lock().expect("state");
                    s.first_next.get_or_insert_with(Instant::now);
                }
                loop {
                    let notified = self.notify.notified();
                    if let Some((id, event, deadline)) =
                        self.state.lock().expect("state").pending.pop_front()
                    {
                        let headers = format!(
                            "lambda-runtime-aws-request-id: {id}\r\nlambda-runtime-deadline-ms: {deadline}\r\nlambda-runtime-invoked-function-arn: arn:aws:lambda:us-east-1:123456789012:function:agentq-agent\r\nlambda-runtime-trace-id: Root=1-00000000-000000000000000000000000\r\n"
                        );
                        return ok("200 OK", &headers, &event);
                    }
                    notified.await;
                }
            }
            ("POST", p) if p.starts_with("/2018-06-01/runtime/invocation/") => {
                let rest = &p["/2018-06-01/runtime/invocation/".len()..];
                let (id, kind) = rest.split_once('/').unwrap_or((rest, ""));
                let answer = if kind == "response" {
                    Answer::Response(body)
                } else {
                    Answer::Error(body)
                };
                self.state
                    .lock()
                    .expect("state")
                    .answers
                    .insert(id.to_owned(), answer);
                ok("202 Accepted", "", "{}")
            }
            ("POST", "/2018-06-01/runtime/init/error") => {
                self.state.lock().expect("state").init_error = Some(body);
                ok("202 Accepted", "", "{}")
            }
            ("POST", "/2020-01-01/extension/register") => ok(
                "200 OK",
                "lambda-extension-identifier: 00000000-0000-0000-0000-000000000001\r\n",
                r#"{"functionName":"agentq-agent","functionVersion":"$LATEST","handler":"bootstrap"}"#,
            ),
            ("GET", "/2020-01-01/extension/event/next") => {
                // Teardown never comes in tests: hold the long poll.
                std::future::pending::<()>().await;
                String::new()
            }
            _ => ok("404 Not Found", "", r#"{"errorType":"NotFound"}"#),
        }
    }
}

/// The environment Lambda gives a function, pointing at `api`.
pub fn lambda_env(api: &RuntimeApi) -> Vec<(String, String)> {
    [
        ("AWS_LAMBDA_RUNTIME_API", api.addr.as_str()),
        ("AWS_LAMBDA_FUNCTION_NAME", "agentq-agent"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "2048"),
        ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/agentq-agent"),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "local"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

//! `agentq dashboard`: a local web UI over the same AWS settings as the other commands.
//!
//! - `/`: jobs with filters (state, label, changed within, limit); the table refreshes
//!   itself (the page polls `/fragments/jobs`).
//! - `/jobs/{id}`: state, progress, attempts, decisions, a turns/tokens/cost chart and the
//!   live log tail (stdout, stderr, events), streamed by server-sent events from
//!   `/jobs/{id}/live` ([`live`]); `/jobs/{id}/logs/{attempt}/{stream}` is a whole log as
//!   plain text; `POST /jobs/{id}/cancel` cancels (token and origin checked: [`guard`]).
//! - `/failures`: the jobs and dead-letter queue depths (`GetQueueAttributes`; the DLQ is
//!   never received from, so the dispatcher misses nothing), jobs waiting for a re-plan
//!   (FAILED, TIMED_OUT) and DEAD jobs with their reasons.
//!
//! Pages are rendered on the server ([`html`]) with a little JavaScript; the script and the
//! stylesheet are compiled into the binary. [`Dashboard::serve`] runs until the shutdown
//! future resolves, then ends the live streams and drains connections for at most
//! [`DRAIN`].

pub mod chart;
pub mod filter;
pub mod guard;
pub mod html;
pub mod live;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentq_core::record::now_ms;
use agentq_core::store::CancelOutcome;
use agentq_core::{Attempt, JobId, JobState, Stream};
use aws_sdk_sqs::types::QueueAttributeName;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::error::{ErrorClass, ProducerError};
use crate::producer::Producer;
use filter::ListFilter;
use guard::{HostGuard, Refusal, Token};
use html::{CancelNotice, QueueDepth};

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7780";
/// How long open connections get to finish after shutdown.
pub const DRAIN: Duration = Duration::from_secs(5);
/// Jobs shown per table on the failures page.
const FAILURES_LIMIT: usize = 100;

const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");
const ICON_SVG: &str = include_str!("assets/icon.svg");

/// Settings of a dashboard.
#[derive(Debug, Clone)]
pub struct DashboardOptions {
    /// How often pages and live streams poll AWS.
    pub refresh: Duration,
    /// Extra Host names to answer to (see [`guard`]).
    pub allow_hosts: Vec<String>,
    /// Live log streams open at once (one per open job page).
    pub max_streams: usize,
}

impl Default for DashboardOptions {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(2),
            allow_hosts: Vec::new(),
            max_streams: 32,
        }
    }
}

/// What every handler shares.
#[derive(Debug)]
pub struct App {
    producer: Producer,
    opts: DashboardOptions,
    token: Token,
    hosts: HostGuard,
    streams: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
}

/// A dashboard bound to an address; [`Dashboard::router`] for tests, [`Dashboard::serve`]
/// to run it.
#[derive(Debug)]
pub struct Dashboard {
    app: Arc<App>,
    stop: watch::Sender<bool>,
}

impl Dashboard {
    /// A dashboard that will answer on `addr` (the address actually bound).
    pub fn new(
        producer: Producer,
        opts: DashboardOptions,
        addr: SocketAddr,
    ) -> Result<Self, ProducerError> {
        if opts.refresh < Duration::from_millis(200) || opts.refresh > Duration::from_secs(60) {
            return Err(ProducerError::Input(format!(
                "--refresh {:?} is out of range: use 200ms to 60s",
                opts.refresh
            )));
        }
        producer.store()?;
        producer.settings().bucket()?;
        let token = Token::generate().map_err(ProducerError::Input)?;
        let (stop, shutdown) = watch::channel(false);
        Ok(Self {
            app: Arc::new(App {
                hosts: HostGuard::new(addr, &opts.allow_hosts),
                streams: Arc::new(Semaphore::new(opts.max_streams.max(1))),
                producer,
                opts,
                token,
                shutdown,
            }),
            stop,
        })
    }

    /// The per-process anti-CSRF token (tests post with it).
    pub fn token(&self) -> &str {
        self.app.token.as_str()
    }

    /// The routes, with the Host check and security headers on every response.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(jobs_page))
            .route("/fragments/jobs", get(jobs_fragment))
            .route("/failures", get(failures_page))
            .route("/fragments/failures", get(failures_fragment))
            .route("/jobs/{id}", get(job_page))
            .route("/jobs/{id}/live", get(job_live))
            .route("/jobs/{id}/cancel", post(cancel))
            .route("/jobs/{id}/logs/{attempt}/{stream}", get(full_log))
            .route("/assets/app.js", get(app_js))
            .route("/assets/style.css", get(style_css))
            .route("/assets/icon.svg", get(icon_svg))
            .route("/favicon.ico", get(icon_svg))
            .route("/healthz", get(|| async { "ok" }))
            .fallback(not_found)
            .layer(middleware::from_fn_with_state(self.app.clone(), frame))
            .with_state(self.app.clone())
    }

    /// Serves until `shutdown` resolves; then live streams end and open connections get
    /// [`DRAIN`] to finish.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ProducerError> {
        let router = self.router();
        let stop = self.stop;
        let (drained_tx, mut drained_rx) = watch::channel(false);
        let server = axum::serve(listener, router).with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop.send(true);
            let _ = drained_tx.send(true);
        });
        let mut server = std::pin::pin!(server.into_future());
        tokio::select! {
            r = &mut server => r.map_err(ProducerError::Output),
            _ = async {
                let _ = drained_rx.wait_for(|d| *d).await;
                tokio::time::sleep(DRAIN).await;
            } => {
                tracing::warn!("connections still open {DRAIN:?} after shutdown; closing them");
                Ok(())
            }
        }
    }
}

/// An error page with a status.
#[derive(Debug)]
struct WebError {
    status: StatusCode,
    message: String,
}

impl WebError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<ProducerError> for WebError {
    fn from(e: ProducerError) -> Self {
        let status = match e.class() {
            ErrorClass::Usage => StatusCode::BAD_REQUEST,
            ErrorClass::NotFound => StatusCode::NOT_FOUND,
            ErrorClass::Service => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let hint = if e.class() == ErrorClass::Service && e.is_retryable() {
            " (transient: the page retries)"
        } else {
            ""
        };
        Self::new(status, format!("{e}{hint}"))
    }
}

impl From<Refusal> for WebError {
    fn from(r: Refusal) -> Self {
        Self::new(StatusCode::FORBIDDEN, r.to_string())
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        (
            self.status,
            Html(html::error_page(self.status.as_u16(), &self.message)),
        )
            .into_response()
    }
}

type WebResult<T = Response> = Result<T, WebError>;

/// Host check before, security headers after, every request.
async fn frame(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let mut resp = match app.hosts.check(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(r) => WebError::from(r).into_response(),
    };
    guard::security_headers(resp.headers_mut());
    resp
}

fn job_id(raw: &str) -> WebResult<JobId> {
    JobId::parse(raw).map_err(|e| {
        WebError::new(
            StatusCode::BAD_REQUEST,
            format!("job id {raw:?} in the address is not valid: {e}"),
        )
    })
}

fn parse_filter(q: Option<String>) -> WebResult<ListFilter> {
    ListFilter::parse(q.as_deref().unwrap_or(""))
        .map_err(|e| WebError::new(StatusCode::BAD_REQUEST, e))
}

async fn jobs_table(app: &App, f: &ListFilter) -> WebResult<String> {
    let window = f.window();
    let records = app.producer.list(&f.states, window).await?;
    let scanned = records.len();
    let rows = f.apply(records, now_ms());
    Ok(html::jobs_table(&rows, f, scanned))
}

async fn jobs_page(State(app): State<Arc<App>>, RawQuery(q): RawQuery) -> WebResult {
    let f = parse_filter(q)?;
    let table = jobs_table(&app, &f).await?;
    Ok(Html(html::jobs_page(&f, &table, app.opts.refresh.as_millis())).into_response())
}

async fn jobs_fragment(State(app): State<Arc<App>>, RawQuery(q): RawQuery) -> WebResult {
    let f = parse_filter(q)?;
    Ok(Html(jobs_table(&app, &f).await?).into_response())
}

async fn queue_depth(app: &App, key: &'static str, url: &str) -> Result<QueueDepth, String> {
    let out = app
        .producer
        .clients
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .map_err(|e| {
            format!(
                "GetQueueAttributes {url} failed: {}",
                agentq_core::aws::display(&e)
            )
        })?;
    let attrs = out.attributes.unwrap_or_default();
    let n = |a: QueueAttributeName| {
        attrs
            .get(&a)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(QueueDepth {
        key,
        url: url.to_owned(),
        visible: n(QueueAttributeName::ApproximateNumberOfMessages),
        in_flight: n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        delayed: n(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
    })
}

async fn failures_html(app: &App) -> WebResult<String> {
    let s = app.producer.settings();
    let jobs_q = async {
        match s.queue_url() {
            Ok(u) => queue_depth(app, "jobs", u).await,
            Err(e) => Err(e.to_string()),
        }
    };
    let dlq = async {
        match s.dlq_url() {
            Ok(u) => queue_depth(app, "dlq", u).await,
            Err(e) => Err(e.to_string()),
        }
    };
    let waiting = app
        .producer
        .list(&[JobState::Failed, JobState::TimedOut], FAILURES_LIMIT);
    let dead = app.producer.list(&[JobState::Dead], FAILURES_LIMIT);
    let (jq, dq, waiting, dead) = tokio::join!(jobs_q, dlq, waiting, dead);
    Ok(html::failures_fragment(
        &[jq, dq],
        &waiting?,
        &dead?,
        FAILURES_LIMIT,
    ))
}

async fn failures_page(State(app): State<Arc<App>>) -> WebResult {
    let frag = Box::pin(failures_html(&app)).await?;
    Ok(Html(html::failures_page(&frag, app.opts.refresh.as_millis())).into_response())
}

async fn failures_fragment(State(app): State<Arc<App>>) -> WebResult {
    Ok(Html(Box::pin(failures_html(&app)).await?).into_response())
}

async fn job_page(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> WebResult {
    let job = job_id(&id)?;
    let rec = app.producer.status(&job).await?;
    let notice = form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "cancel")
        .and_then(|(_, v)| CancelNotice::parse(&v));
    // The summary (with its chart) arrives with the live stream's first message.
    let placeholder = html::job_summary(
        &rec,
        &chart::svg(&[], rec.created_at, now_ms(), false),
        app.token.as_str(),
        now_ms(),
    );
    Ok(Html(html::job_page(&rec, &placeholder, notice)).into_response())
}

async fn job_live(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> WebResult {
    let job = job_id(&id)?;
    app.producer.status(&job).await?;
    let permit = app.streams.clone().try_acquire_owned().map_err(|_| {
        WebError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} job pages are streaming already: close some, or start the dashboard with a higher limit",
                app.opts.max_streams
            ),
        )
    })?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(live::Cursor::decode);
    let rx = live::spawn(app.clone(), job, resume, permit);
    let stream = futures::stream::unfold(rx, |mut rx: mpsc::Receiver<live::Msg>| async move {
        let msg = rx.recv().await?;
        Some((Ok::<Event, std::convert::Infallible>(event(msg)), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// The wire form of a live message; data is always one JSON line.
fn event(m: live::Msg) -> Event {
    match m {
        live::Msg::Summary(html) => Event::default()
            .event("summary")
            .data(serde_json::json!({ "html": html }).to_string()),
        live::Msg::Log {
            stream,
            attempt,
            seq,
            text,
            skipped,
            cursor,
        } => Event::default().event("log").id(cursor).data(
            serde_json::json!({
                "stream": stream.as_str(),
                "attempt": attempt,
                "seq": seq,
                "text": text,
                "skipped": skipped,
            })
            .to_string(),
        ),
        live::Msg::Problem(p) => Event::default()
            .event("problem")
            .data(serde_json::json!({ "message": p }).to_string()),
        live::Msg::End => Event::default().event("end").data("{}"),
    }
}

#[derive(Debug, serde::Deserialize)]
struct CancelForm {
    token: Option<String>,
}

async fn cancel(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    form: Result<axum::Form<CancelForm>, axum::extract::rejection::FormRejection>,
) -> WebResult {
    // A body that is not a form is treated as carrying no token.
    let form_token = form.as_ref().ok().and_then(|f| f.token.as_deref());
    app.hosts.check_change(&headers, &app.token, form_token)?;
    let job = job_id(&id)?;
    let notice = match app.producer.cancel(&job).await? {
        CancelOutcome::Cancelled => CancelNotice::Cancelled,
        CancelOutcome::Flagged => CancelNotice::Flagged,
        CancelOutcome::AlreadyFinished(_) => CancelNotice::AlreadyFinished,
    };
    tracing::info!(job = %job, outcome = notice.as_str(), "cancel from the dashboard");
    Ok(Redirect::to(&format!("/jobs/{job}?cancel={}", notice.as_str())).into_response())
}

/// A whole log of one attempt as plain text, read segment by segment.
async fn full_log(
    State(app): State<Arc<App>>,
    Path((id, attempt, stream)): Path<(String, u32, String)>,
) -> WebResult {
    let job = job_id(&id)?;
    let stream: Stream = stream
        .parse()
        .map_err(|e: String| WebError::new(StatusCode::BAD_REQUEST, e))?;
    app.producer.status(&job).await?;
    let keys = app
        .producer
        .list_segments(&job, Attempt(attempt), stream, None)
        .await?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    let producer = app.producer.clone();
    tokio::spawn(async move {
        for key in keys {
            let chunk = producer
                .read_object(&key)
                .await
                .map(Bytes::from)
                .map_err(std::io::Error::other);
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                return;
            }
        }
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| (c, rx))
    }));
    let content_type = match stream {
        Stream::Events => "application/x-ndjson; charset=utf-8",
        _ => "text/plain; charset=utf-8",
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "inline; filename=\"{job}-attempt-{attempt}-{}.txt\"",
                    stream.as_str()
                ),
            ),
        ],
        body,
    )
        .into_response())
}

async fn app_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_JS,
    )
        .into_response()
}

async fn style_css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        STYLE_CSS,
    )
        .into_response()
}

async fn icon_svg() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        ICON_SVG,
    )
        .into_response()
}

async fn not_found() -> WebError {
    WebError::new(StatusCode::NOT_FOUND, "no such page")
}

//! The fault proxy against the emulator with the real SDK clients: each injected error
//! parses as the service's own error code and is classified transient by agentq's
//! helper; a connection dropped after forwarding leaves the call's effect behind; latency
//! goes only where it is asked for; big bodies and the control API pass through.

use std::time::Duration;

use agentq_testkit::faultproxy::{Fault, FaultConfig, FaultProxy, Service};
use agentq_testkit::{ACCESS_KEY, REGION, SECRET_KEY, emulator, resources, unique};
use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_sqs::error::ProvideErrorMetadata;

async fn proxy(config: FaultConfig) -> FaultProxy {
    let emu = emulator().await;
    FaultProxy::start(&emu.endpoint, "127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("proxy starts")
}

/// SDK config through `proxy`, with the SDK's own retries off so every fault shows.
async fn sdk(proxy: &FaultProxy) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(proxy.endpoint())
        .region(Region::new(REGION))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            ACCESS_KEY, SECRET_KEY, None, None, "test",
        ))
        .retry_config(RetryConfig::disabled())
        .load()
        .await
}

#[tokio::test]
async fn injected_errors_have_each_service_s_shape_and_are_transient() {
    let r = resources().await;
    for (fault, sqs_code, ddb_codes, s3_code, status) in [
        (
            Fault::Throttle,
            "RequestThrottled",
            &[
                "ProvisionedThroughputExceededException",
                "ThrottlingException",
            ][..],
            "SlowDown",
            (400, 503),
        ),
        (
            Fault::TooManyRequests,
            "RequestThrottled",
            &[
                "ProvisionedThroughputExceededException",
                "ThrottlingException",
            ][..],
            "SlowDown",
            (429, 429),
        ),
        (
            Fault::Internal,
            "InternalError",
            &["InternalServerError"][..],
            "InternalError",
            (500, 500),
        ),
        (
            Fault::Unavailable,
            "ServiceUnavailable",
            &["ServiceUnavailable"][..],
            "ServiceUnavailable",
            (503, 503),
        ),
    ] {
        let p = proxy(FaultConfig::only(fault, 1.0, 3)).await;
        let conf = sdk(&p).await;

        let e = aws_sdk_sqs::Client::new(&conf)
            .send_message()
            .queue_url(&r.queue_url)
            .message_body("x")
            .send()
            .await
            .expect_err("faulted");
        assert_eq!(e.code(), Some(sqs_code), "{fault:?}: {e:?}");
        assert_eq!(e.raw_response().unwrap().status().as_u16(), status.0);
        assert!(agentq_core::aws::is_transient(&e), "{fault:?}");

        let e = aws_sdk_dynamodb::Client::new(&conf)
            .get_item()
            .table_name(&r.table)
            .key(
                "job_id",
                aws_sdk_dynamodb::types::AttributeValue::S("x".into()),
            )
            .send()
            .await
            .expect_err("faulted");
        assert!(
            ddb_codes.contains(&e.code().unwrap_or_default()),
            "{fault:?}: {e:?}"
        );
        assert!(agentq_core::aws::is_transient(&e), "{fault:?}");

        let e = agentq_core::config::s3_client(&conf)
            .put_object()
            .bucket(&r.bucket)
            .key("k")
            .body(b"data".to_vec().into())
            .send()
            .await
            .expect_err("faulted");
        assert_eq!(e.code(), Some(s3_code), "{fault:?}: {e:?}");
        assert_eq!(e.raw_response().unwrap().status().as_u16(), status.1);
        assert!(agentq_core::aws::is_transient(&e), "{fault:?}");

        let e = aws_sdk_ssm::Client::new(&conf)
            .get_parameter()
            .name("/nothing/here")
            .send()
            .await
            .expect_err("faulted");
        assert!(
            matches!(
                e.code(),
                Some("ThrottlingException" | "InternalServerError" | "ServiceUnavailable")
            ),
            "{fault:?}: {e:?}"
        );

        let st = p.stats();
        for s in [Service::Sqs, Service::Dynamodb, Service::S3, Service::Ssm] {
            assert_eq!(st.faults[&s][&fault], 1, "{s:?} {fault:?}: {st:?}");
        }
        assert_eq!(st.forwarded, 0);
    }
}

#[tokio::test]
async fn a_drop_after_forwarding_takes_effect_but_the_client_sees_an_error() {
    let r = resources().await;
    let p = proxy(FaultConfig::only(Fault::DropAfter, 1.0, 5)).await;
    let conf = sdk(&p).await;
    let e = aws_sdk_sqs::Client::new(&conf)
        .send_message()
        .queue_url(&r.queue_url)
        .message_body("took effect")
        .send()
        .await
        .expect_err("the answer never came");
    assert!(agentq_core::aws::is_transient(&e), "{e:?}");
    assert_eq!(r.drain(&r.queue_url).await, vec!["took effect".to_owned()]);

    p.set_config(FaultConfig::only(Fault::DropBefore, 1.0, 5))
        .unwrap();
    let e = aws_sdk_sqs::Client::new(&conf)
        .send_message()
        .queue_url(&r.queue_url)
        .message_body("never sent")
        .send()
        .await
        .expect_err("dropped");
    assert!(agentq_core::aws::is_transient(&e), "{e:?}");
    assert!(r.drain(&r.queue_url).await.is_empty());
    let st = p.stats();
    assert_eq!(st.faults_of(Fault::DropAfter), 1);
    assert_eq!(st.faults_of(Fault::DropBefore), 1);
}

#[tokio::test]
async fn latency_only_where_asked_and_big_bodies_pass_through() {
    let r = resources().await;
    let p = proxy(FaultConfig {
        latency_ms: 200,
        jitter_ms: 50,
        latency_services: vec![Service::S3],
        ..FaultConfig::default()
    })
    .await;
    let conf = sdk(&p).await;
    let s3 = agentq_core::config::s3_client(&conf);
    // Large enough for the SDK to stream it and for an `Expect: 100-continue`.
    let body: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let t = tokio::time::Instant::now();
    s3.put_object()
        .bucket(&r.bucket)
        .key("big")
        .body(body.clone().into())
        .send()
        .await
        .expect("put through the proxy");
    let got = s3
        .get_object()
        .bucket(&r.bucket)
        .key("big")
        .send()
        .await
        .expect("get through the proxy")
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "two S3 calls, each delayed by at least 200 ms"
    );
    assert_eq!(got.len(), body.len());
    assert!(got.as_ref() == body.as_slice());
    aws_sdk_sqs::Client::new(&conf)
        .get_queue_attributes()
        .queue_url(&r.queue_url)
        .send()
        .await
        .expect("sqs through the proxy");
    let st = p.stats();
    assert_eq!(st.delayed, 2, "only the S3 calls: {st:?}");
    assert_eq!(st.requests[&Service::Sqs], 1);
    assert_eq!(st.forwarded, 3);
    assert_eq!(st.total_faults(), 0);
}

/// One HTTP/1.1 exchange over a fresh connection.
async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn the_control_api_reads_counters_and_changes_faults() {
    let r = resources().await;
    let p = proxy(FaultConfig::default()).await;
    let conf = sdk(&p).await;
    let sqs = aws_sdk_sqs::Client::new(&conf);
    sqs.send_message()
        .queue_url(&r.queue_url)
        .message_body(unique("m"))
        .send()
        .await
        .expect("no faults yet");
    let stats = http(p.addr(), "GET", "/__faultproxy/stats", "").await;
    assert!(stats.starts_with("HTTP/1.1 200"), "{stats}");
    assert!(stats.contains(r#""sqs":1"#), "{stats}");

    let bad = http(
        p.addr(),
        "PUT",
        "/__faultproxy/config",
        r#"{"faults":{"internal":2}}"#,
    )
    .await;
    assert!(
        bad.starts_with("HTTP/1.1 400") && bad.contains("faults.internal"),
        "{bad}"
    );
    let ok = http(
        p.addr(),
        "PUT",
        "/__faultproxy/config",
        r#"{"seed":9,"faults":{"internal":1.0},"fault_services":["sqs"]}"#,
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let e = sqs
        .send_message()
        .queue_url(&r.queue_url)
        .message_body("x")
        .send()
        .await
        .expect_err("faulted now");
    assert_eq!(e.code(), Some("InternalError"));
    // S3 is not in fault_services.
    agentq_core::config::s3_client(&conf)
        .head_bucket()
        .bucket(&r.bucket)
        .send()
        .await
        .expect("s3 untouched");
}

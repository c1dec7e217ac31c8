//! `tests/agent-clis/install` says clearly that the npm registry is unreachable and fails,
//! instead of letting the real-CLI tests pass without the real CLIs.

use std::process::Stdio;

#[tokio::test]
async fn the_installer_fails_loudly_when_the_registry_is_unreachable() {
    let cache = tempfile::tempdir().unwrap();
    // A port nothing listens on: connection refused at once.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let out = tokio::process::Command::new("bash")
        .arg(agentq_testkit::repo_root().join("tests/agent-clis/install"))
        .env("AGENTQ_AGENT_CLIS_CACHE", cache.path())
        .env("npm_config_registry", format!("http://127.0.0.1:{port}/"))
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run the installer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "no install directory is printed");
    assert!(
        stderr.contains(&format!(
            "the npm registry (http://127.0.0.1:{port}/) is unreachable"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("fail without them, by design"), "{stderr}");
    // Nothing half-installed is left to be mistaken for a cache.
    let left: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

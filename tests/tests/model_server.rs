//! The scripted model server (`tests/models/model-server`) speaks the wire formats the real
//! CLIs expect: Anthropic Messages server-sent events (text and tool_use), non-streamed
//! JSON, OpenAI Responses events with a call of whichever shell tool Codex offers, rate
//! limits with their reset headers; side requests do not consume the script; every request
//! is recorded.

use std::time::Duration;

use agentq_testkit::models::{ModelServer, Script, Turn};
use serde_json::{Value, json};

/// `(event name, data)` pairs of a server-sent event stream.
fn sse(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (name, serde_json::from_str(&data).expect("data is JSON"))
        })
        .collect()
}

fn messages_request(stream: bool, tools: &[&str]) -> String {
    json!({
        "model": "claude-test", "max_tokens": 1024, "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": tools.iter().map(|t| json!({"name": t, "input_schema": {"type": "object"}})).collect::<Vec<_>>(),
    })
    .to_string()
}

const ANTHROPIC: &[(&str, &str)] = &[("anthropic-version", "2023-06-01")];

#[tokio::test]
async fn anthropic_text_and_tool_use_stream_in_the_messages_event_order() {
    let server = ModelServer::start(
        &Script::new()
            .turn(Turn::text("hello").usage(11, 7))
            .turn(Turn::bash("echo hi > out.txt").saying("running")),
    )
    .await;
    let (status, body) = server
        .request(
            "POST",
            "/v1/messages?beta=true",
            ANTHROPIC,
            &messages_request(true, &["Bash", "Write"]),
        )
        .await;
    assert_eq!(status, 200);
    let events = sse(&body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 11);
    assert_eq!(events[3].1["delta"]["text"], "hello");
    assert_eq!(events[5].1["delta"]["stop_reason"], "end_turn");
    assert_eq!(events[5].1["usage"]["output_tokens"], 7);

    let (_, body) = server
        .request(
            "POST",
            "/v1/messages?beta=true",
            ANTHROPIC,
            &messages_request(true, &["Bash"]),
        )
        .await;
    let events = sse(&body);
    let tool_start = events
        .iter()
        .find(|(n, d)| n == "content_block_start" && d["content_block"]["type"] == "tool_use")
        .expect("a tool_use block");
    assert_eq!(tool_start.1["content_block"]["name"], "Bash");
    let index = tool_start.1["index"].clone();
    let input: String = events
        .iter()
        .filter(|(_, d)| d["index"] == index && d["delta"]["type"] == "input_json_delta")
        .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap().to_owned())
        .collect();
    let input: Value = serde_json::from_str(&input).unwrap();
    assert_eq!(input["command"], "echo hi > out.txt");
    let delta = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");

    let reqs = server.requests().await;
    assert_eq!(reqs.len(), 2);
    assert_eq!(
        reqs.iter().map(|r| r.turn_index).collect::<Vec<_>>(),
        [Some(0), Some(1)]
    );
    assert_eq!(reqs[1].tool_names(), ["Bash"]);
    assert_eq!(reqs[0].headers["anthropic-version"], "2023-06-01");
}

#[tokio::test]
async fn anthropic_non_streamed_write_uses_the_write_tool_or_bash_without_it() {
    let server = ModelServer::start(
        &Script::new()
            .turn(Turn::write("/tmp/x/a.txt", "one\ntwo\n"))
            .turn(Turn::write("/tmp/x/b.txt", "three")),
    )
    .await;
    let (status, body) = server
        .request(
            "POST",
            "/v1/messages",
            ANTHROPIC,
            &messages_request(false, &["Bash", "Write"]),
        )
        .await;
    assert_eq!(status, 200);
    let msg: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(msg["type"], "message");
    assert_eq!(msg["stop_reason"], "tool_use");
    assert_eq!(msg["content"][0]["name"], "Write");
    assert_eq!(msg["content"][0]["input"]["file_path"], "/tmp/x/a.txt");
    assert_eq!(msg["content"][0]["input"]["content"], "one\ntwo\n");

    // Without a Write tool the file is written by a shell command that really works.
    let (_, body) = server
        .request(
            "POST",
            "/v1/messages",
            ANTHROPIC,
            &messages_request(false, &["Bash"]),
        )
        .await;
    let msg: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(msg["content"][0]["name"], "Bash");
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("sub/b.txt");
    let cmd = msg["content"][0]["input"]["command"]
        .as_str()
        .unwrap()
        .replace("/tmp/x/b.txt", &target.display().to_string());
    let out = tokio::process::Command::new("bash")
        .args(["-c", &cmd])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(tokio::fs::read_to_string(&target).await.unwrap(), "three");
}

#[tokio::test]
async fn side_requests_do_not_consume_the_script() {
    let server = ModelServer::start(&Script::new().turn(Turn::text("the real answer"))).await;
    // A request without tools (a title, a summary) and a token count.
    let (s1, body) = server
        .request(
            "POST",
            "/v1/messages",
            ANTHROPIC,
            &messages_request(false, &[]),
        )
        .await;
    assert_eq!(s1, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["content"][0]["text"],
        "ok"
    );
    let (s2, body) = server
        .request(
            "POST",
            "/v1/messages/count_tokens",
            ANTHROPIC,
            &messages_request(false, &["Bash"]),
        )
        .await;
    assert_eq!(s2, 200);
    assert!(serde_json::from_str::<Value>(&body).unwrap()["input_tokens"].as_u64() > Some(0));
    let (s3, _) = server.request("GET", "/v1/models", ANTHROPIC, "").await;
    assert_eq!(s3, 200);
    let (_, body) = server
        .request(
            "POST",
            "/v1/messages",
            ANTHROPIC,
            &messages_request(false, &["Bash"]),
        )
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["content"][0]["text"],
        "the real answer"
    );
    // Once the turns are used up, the `after` answer (default "done").
    let (_, body) = server
        .request(
            "POST",
            "/v1/messages",
            ANTHROPIC,
            &messages_request(false, &["Bash"]),
        )
        .await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["content"][0]["text"],
        "done"
    );
    let reqs = server.requests().await;
    assert_eq!(reqs.len(), 5);
    assert_eq!(reqs.iter().filter(|r| r.is_turn()).count(), 2);
    assert_eq!(server.turn_requests().await[1].turn_index, None);
}

#[tokio::test]
async fn a_rate_limit_answers_429_with_retry_after_and_reset_headers_for_as_long_as_scripted() {
    let server = ModelServer::start(
        &Script::new()
            .turn(Turn::rate_limit(2, 30).times(2))
            .turn(Turn::text("through")),
    )
    .await;
    let before = std::time::SystemTime::now();
    for _ in 0..2 {
        let (status, headers, body) = server
            .request_full(
                "POST",
                "/v1/messages?beta=true",
                ANTHROPIC,
                &messages_request(true, &["Bash"]),
            )
            .await;
        assert_eq!(status, 429);
        assert_eq!(headers["retry-after"], "2");
        let reset = &headers["anthropic-ratelimit-requests-reset"];
        assert!(reset.ends_with('Z') && reset.contains('T'), "{reset}");
        assert_eq!(headers["anthropic-ratelimit-tokens-remaining"], "0");
        let err: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(err["type"], "error");
        assert_eq!(err["error"]["type"], "rate_limit_error");
    }
    let (status, _) = server
        .request(
            "POST",
            "/v1/messages?beta=true",
            ANTHROPIC,
            &messages_request(true, &["Bash"]),
        )
        .await;
    assert_eq!(status, 200);
    assert!(before.elapsed().unwrap() < Duration::from_secs(10));

    // The OpenAI flavour: the same turn, with x-ratelimit headers.
    server
        .set_script(&Script::new().turn(Turn::rate_limit(1, 20)))
        .await;
    let (status, headers, body) = server
        .request_full(
            "POST",
            "/v1/responses",
            &[],
            &json!({"model": "gpt-test", "stream": true, "input": []}).to_string(),
        )
        .await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["x-ratelimit-reset-requests"], "20s");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
}

#[tokio::test]
async fn openai_responses_stream_calls_the_shell_tool_codex_offers() {
    let server = ModelServer::start(
        &Script::new()
            .turn(Turn::bash("echo hi").saying("running").usage(500, 40))
            .turn(Turn::bash("echo again"))
            .turn(Turn::text("finished")),
    )
    .await;
    let req = |tool: &str| {
        json!({"model": "gpt-test", "stream": true, "input": [],
               "tools": [{"type": "function", "name": tool, "parameters": {}}, {"type": "web_search"}]})
        .to_string()
    };
    let (status, body) = server
        .request("POST", "/v1/responses", &[], &req("exec_command"))
        .await;
    assert_eq!(status, 200);
    let events = sse(&body);
    assert_eq!(events.first().unwrap().0, "response.created");
    let done: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "response.output_item.done")
        .map(|(_, d)| &d["item"])
        .collect();
    assert_eq!(done.len(), 2);
    assert_eq!(done[0]["type"], "message");
    assert_eq!(done[0]["content"][0]["text"], "running");
    assert_eq!(done[1]["type"], "function_call");
    assert_eq!(done[1]["name"], "exec_command");
    let args: Value = serde_json::from_str(done[1]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["cmd"], "echo hi");
    let (name, completed) = events.last().unwrap();
    assert_eq!(name, "response.completed");
    assert_eq!(completed["response"]["usage"]["input_tokens"], 500);
    assert_eq!(completed["response"]["usage"]["total_tokens"], 540);

    // An older Codex offers `shell` with an argv.
    let (_, body) = server
        .request("POST", "/v1/responses", &[], &req("shell"))
        .await;
    let call = sse(&body)
        .into_iter()
        .find(|(n, d)| n == "response.output_item.done" && d["item"]["type"] == "function_call")
        .unwrap()
        .1;
    let args: Value = serde_json::from_str(call["item"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args["command"], json!(["bash", "-lc", "echo again"]));
    let reqs = server.turn_requests().await;
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].tool_names(), ["exec_command", "web_search"]);
}

#[tokio::test]
async fn in_codex_code_mode_the_command_runs_through_a_javascript_exec_cell() {
    let server = ModelServer::start(&Script::new().turn(Turn::bash("echo \"hi there\""))).await;
    // Codex's default model gets no top-level tools, only namespaces in an input item.
    let req = json!({"model": "gpt-default", "stream": true, "input": [
        {"type": "additional_tools", "role": "developer", "tools": [
            {"type": "namespace", "name": "functions", "tools": [
                {"type": "custom", "name": "exec"}, {"type": "function", "name": "wait"}]}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]});
    let (_, body) = server
        .request("POST", "/v1/responses", &[], &req.to_string())
        .await;
    let call = sse(&body)
        .into_iter()
        .find(|(n, _)| n == "response.output_item.done")
        .unwrap()
        .1;
    assert_eq!(call["item"]["type"], "custom_tool_call");
    assert_eq!(call["item"]["name"], "exec");
    assert_eq!(
        call["item"]["input"],
        "const r = await tools.exec_command({\"cmd\": \"echo \\\"hi there\\\"\"});\ntext(r);"
    );
    assert_eq!(
        server.turn_requests().await[0].tool_names(),
        ["exec", "wait"]
    );
}

#[tokio::test]
async fn a_sleeping_turn_answers_late() {
    let server = ModelServer::start(&Script::new().turn(Turn::text("late").after_sleep(1.0))).await;
    let started = std::time::Instant::now();
    let (status, _) = server
        .request(
            "POST",
            "/v1/messages",
            ANTHROPIC,
            &messages_request(false, &["Bash"]),
        )
        .await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn a_bad_script_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.json");
    tokio::fs::write(&path, r#"{"turns": [{"text": "ok"}, {"bsh": "ls"}]}"#)
        .await
        .unwrap();
    let out = tokio::process::Command::new("python3")
        .arg(agentq_testkit::repo_root().join("tests/models/model-server"))
        .arg("--script")
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("turns[1]") && err.contains("bsh"), "{err}");

    // The control endpoint refuses it too and keeps the old script.
    let server = ModelServer::start(&Script::new().turn(Turn::text("kept"))).await;
    let (status, body) = server
        .post("/_control/script", r#"{"turns": [{"error": {}}]}"#)
        .await;
    assert_eq!(status, 400);
    assert!(body.contains("turns[0].error"), "{body}");
    let (_, body) = server
        .request(
            "POST",
            "/v1/messages",
            ANTHROPIC,
            &messages_request(false, &["Bash"]),
        )
        .await;
    assert!(body.contains("kept"));
}

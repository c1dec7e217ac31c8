//! The three binaries (`agentq`, `agentq-agent`, `agentq-dispatcher`) agree on their
//! interface, read from their own `--help`: every `AGENTQ_*` variable is the name of its
//! flag (`--stale-after-seconds` ↔ `AGENTQ_STALE_AFTER_SECONDS`), a variable read by two
//! binaries is the same setting in both, every one is in the README's settings table,
//! every help page ends with the one exit-code table, and `--output` takes `text|json`
//! everywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use agentq_testkit::{binary, repo_root};

const BINARIES: [&str; 3] = ["agentq", "agentq-agent", "agentq-dispatcher"];

/// `BIN [SUB] --help`, with no `AGENTQ_*` variables set (clap shows their values).
fn help(bin: &str, sub: Option<&str>) -> String {
    let mut cmd = Command::new(binary(bin));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    if let Some(s) = sub {
        cmd.arg(s);
    }
    let out = cmd.arg("--help").output().expect("run --help");
    assert!(out.status.success(), "{bin} {sub:?} --help failed");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

/// The subcommands listed under `Commands:`.
fn subcommands(top: &str) -> Vec<String> {
    top.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|s| s != "help")
        .collect()
}

/// (flag, variable) for every argument that has a variable.
fn flag_env_pairs(help: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut flag: Option<String> = None;
    for line in help.lines() {
        let t = line.trim_start();
        let t = t.strip_prefix('-').and_then(|r| {
            // "-o, --output <OUTPUT>" or "--queue-url <QUEUE_URL>"
            let r = r.split_once(", -").map_or(r, |(_, long)| long);
            r.strip_prefix('-')
        });
        if let Some(long) = t {
            let name: String = long
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            flag = Some(name);
        }
        if let Some((_, rest)) = line.split_once("[env: ") {
            let var: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let f = flag
                .clone()
                .unwrap_or_else(|| panic!("{var} without a flag"));
            pairs.push((f, var));
        }
    }
    pairs
}

#[test]
fn every_variable_is_its_flag_and_every_help_lists_the_exit_codes() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    // variable → (flag, binaries that read it)
    let mut seen: BTreeMap<String, (String, BTreeSet<&str>)> = BTreeMap::new();
    for bin in BINARIES {
        let top = help(bin, None);
        let subs = subcommands(&top);
        assert!(!subs.is_empty(), "{bin} lists no subcommands");
        let mut pages = vec![(format!("{bin} --help"), top)];
        for s in &subs {
            pages.push((format!("{bin} {s} --help"), help(bin, Some(s))));
        }
        for (page, text) in &pages {
            assert!(
                text.contains(agentq_core::exit::HELP),
                "{page} does not end with the shared exit-code table"
            );
            for (flag, var) in flag_env_pairs(text) {
                let want = format!("AGENTQ_{}", flag.to_uppercase().replace('-', "_"));
                assert_eq!(var, want, "{page}: --{flag} reads {var}");
                let entry = seen
                    .entry(var.clone())
                    .or_insert_with(|| (flag.clone(), BTreeSet::new()));
                assert_eq!(entry.0, flag, "{var} is two different flags");
                entry.1.insert(bin);
            }
            if text.contains("--output <OUTPUT>") {
                let short = text.contains("[possible values: text, json]");
                let long = text.contains("- text: ") && text.contains("- json: ");
                assert!(short || long, "{page}: --output is not text|json");
            }
        }
    }
    for must in [
        "AGENTQ_QUEUE_URL",
        "AGENTQ_OUTPUT",
        "AGENTQ_STALE_AFTER_SECONDS",
    ] {
        assert!(seen.contains_key(must), "no binary reads {must}");
    }
    // --output and the stale limit are shared: every binary / both lease readers.
    assert_eq!(
        seen["AGENTQ_OUTPUT"].1.len(),
        3,
        "{:?}",
        seen["AGENTQ_OUTPUT"]
    );
    assert_eq!(
        seen["AGENTQ_STALE_AFTER_SECONDS"].1,
        BTreeSet::from(["agentq-agent", "agentq-dispatcher"])
    );
    for (var, (flag, bins)) in &seen {
        assert!(
            readme.contains(&format!("| `{var}` | `--{flag}` |")),
            "README.md's settings table has no row `| `{var}` | `--{flag}` |` (read by {bins:?})"
        );
    }
}

#[test]
fn a_bad_setting_exits_2_in_every_binary() {
    for (bin, args) in [
        ("agentq", &["list", "--queue-url", "not-a-url"][..]),
        (
            "agentq-agent",
            &["run", "--job", "-", "--queue-url", "not-a-url"][..],
        ),
        (
            "agentq-dispatcher",
            &["replan", "--once", "--queue-url", "not-a-url"][..],
        ),
    ] {
        let out = Command::new(binary(bin))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .args(args)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(i32::from(agentq_core::exit::USAGE)),
            "{bin}: {stderr}"
        );
        assert!(stderr.contains("AGENTQ_QUEUE_URL"), "{bin}: {stderr}");
    }
}

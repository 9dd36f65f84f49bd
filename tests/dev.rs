//! `gossipkv dev`, the command README.md opens with: the cluster it starts
//! answers the `curl` lines it prints, as printed. Needs `curl` (installed
//! by `.ci/run`).

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Stops the dev cluster the way Ctrl-C would, whatever the test did.
struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        // `dev` gives its nodes 10 s to stop cleanly, then kills them.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a printed curl line; its output when it succeeds.
fn run(line: &str) -> Result<String, String> {
    let line = line.replacen("curl", "curl -sS --fail-with-body --max-time 10", 1);
    let output = Command::new("sh")
        .arg("-c")
        .arg(&line)
        .output()
        .map_err(|e| format!("running sh: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{line}: {text} {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Runs `line` until it succeeds (the cluster forms after `dev` prints).
fn run_until_ok(line: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        match run(line) {
            Ok(text) => return text,
            Err(e) if start.elapsed() > limit => panic!("never succeeded: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The path of an example's binary, built first if `cargo test` did not
/// build it (a run filtered to this test does not).
fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/dev-<hash> -> target/<profile>/examples/<name>
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--example", name])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "building example {name}");
    }
    assert!(path.exists(), "{} is missing", path.display());
    path
}

#[test]
fn the_dev_cluster_answers_the_curl_lines_it_prints() {
    assert!(
        Command::new("curl").arg("--version").output().is_ok(),
        "this test runs the curl lines `gossipkv dev` prints: install curl"
    );
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_gossipkv"))
        .arg("dev")
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut dev = Dev(child);
    let stdout = dev.0.stdout.take().unwrap();
    let mut curls = Vec::new();
    let mut example = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line.trim_start().starts_with("curl ") {
            curls.push(line.trim().to_string());
        }
        if let Some(args) = line
            .trim()
            .strip_prefix("cargo run --example device_sync -- ")
        {
            example = Some(args.split(' ').map(String::from).collect::<Vec<_>>());
        }
        if line.starts_with("Ctrl-C") {
            break;
        }
    }
    assert_eq!(curls.len(), 3, "a put, a get and a counter add: {curls:?}");
    let put = run_until_ok(&curls[0], Duration::from_secs(60));
    assert!(put.contains("\"context\""), "{put}");
    // Read through another node: the put reached it (w=1 by default, so
    // it may take a moment).
    let get = run_until_ok(&curls[1], Duration::from_secs(30));
    assert!(get.contains("\"values\":[\"world\"]"), "{get}");
    // Through a third node, which may not have the layout yet (503
    // `unavailable`: refused before anything was written, so retried).
    let added = run_until_ok(&curls[2], Duration::from_secs(30));
    assert!(added.contains("\"value\":5"), "{added}");
    let added = run(&curls[2]).unwrap();
    assert!(added.contains("\"value\":10"), "{added}");

    // The device example, run as printed: it checks its own outcome (the
    // devices converge, the counter is exact) and fails otherwise.
    let example = example.expect("`gossipkv dev` prints how to run examples/device_sync.rs");
    let output = Command::new(example_binary("device_sync"))
        .args(&example)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && text.contains("converged: one note, 800 steps on both"),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("2 siblings"), "{text}");

    // A write refused before its body is read still gets its JSON answer:
    // over HTTP/2 an answer sent before the request's end resets the
    // stream, which curl 7 reports as a framing error (exit 92) instead.
    let put = curls[0].replace("/v1/kv/hello", "/v1/kv/hello?lww=maybe");
    for _ in 0..10 {
        let line = put.replacen("curl", "curl -sS --max-time 10 -w ' %{http_code}'", 1);
        let output = Command::new("sh").arg("-c").arg(&line).output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && text.contains("bad_query") && text.ends_with(" 400"),
            "{text} {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

//! `flowline demo` on the real binary: every flow runs against an embedded
//! server and prints its diagram, the compensated order compensates, the
//! notification arrives, the audit chain holds, and the temporary data dir
//! is gone afterwards; an unreachable `--url` fails fast on one line.

mod common;

use common::BIN;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `flowline ARGS` with `TMPDIR=tmp`, killing it after `limit`:
/// (success, stdout, stderr, how long it took).
fn run(args: &[&str], tmp: &std::path::Path, limit: Duration) -> (bool, String, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("FLOWLINE_LOG")
        .env("TMPDIR", tmp)
        // No flowline.toml of the developer's: the defaults.
        .current_dir(tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flowline demo");
    // Drain both pipes so the child never blocks on a full one.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let Some(status) = status else {
        panic!("flowline demo did not finish within {limit:?}\nstdout:\n{out}\nstderr:\n{err}");
    };
    (status.success(), out, err, started.elapsed())
}

#[test]
fn the_demo_drives_every_flow_prints_its_diagram_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out, err, _) = run(&["demo"], tmp.path(), Duration::from_secs(120));
    assert!(ok, "the demo failed\nstdout:\n{out}\nstderr:\n{err}");
    let ctx = || format!("\nstdout:\n{out}\nstderr:\n{err}");

    // One diagram per flow (the summary is a table), and every step reported.
    assert_eq!(
        out.matches("sequenceDiagram").count(),
        7,
        "one diagram per flow{}",
        ctx()
    );
    for n in 1..=8 {
        assert!(out.contains(&format!("── {n}/8 ")), "no step {n}{}", ctx());
    }
    assert_eq!(out.matches("\n  => ").count(), 7, "{}", ctx());
    // The flows behaved as they should.
    for want in [
        "registered ana.",
        "wrong password 401, audited",
        "\"espresso mug\":",
        "CONFIRMED: BRL 25.00, payment CAPTURED",
        "saga COMPENSATED, compensation: undo reserve_stock",
        "reached Ana's WebSocket",
        "confirmed\" to ana.",
        "POST /api/v1/orders  (2 traces)",
        "saga order.place → payments: do charge_payment",
        "Audit: chain intact",
        "Analytics: orders_per_minute ",
        "demo ok: 8 steps",
    ] {
        assert!(out.contains(want), "no `{want}` in the output{}", ctx());
    }
    // The compensated order's diagram shows the undo.
    assert!(
        out.contains("undo reserve_stock no. 1 ok"),
        "no compensation in a diagram{}",
        ctx()
    );
    // Not a terminal: one plain progress line per step, no redraws. (An
    // error-level log line from a slow shutdown may join them; it is not
    // the demo's output.)
    assert!(!err.contains('\r'), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(lines.len(), 8, "{err}");
    assert!(lines[3].starts_with("[4/8] "), "{err}");

    // The header named the data dir, under TMPDIR, and it is gone.
    let dir = out
        .lines()
        .next()
        .and_then(|l| l.split("data in ").nth(1))
        .and_then(|r| r.split(" (").next())
        .unwrap_or_else(|| panic!("no data dir in the header{}", ctx()));
    assert!(
        std::path::Path::new(dir).starts_with(tmp.path()),
        "{dir} is not under TMPDIR"
    );
    assert!(!std::path::Path::new(dir).exists(), "{dir} was not removed");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn an_unreachable_url_fails_fast_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out, err, took) = run(
        &[
            "demo",
            "--url",
            "http://127.0.0.1:1",
            "--admin-email",
            "admin@example.com",
            "--admin-password",
            "whatever it is",
        ],
        tmp.path(),
        Duration::from_secs(30),
    );
    assert!(!ok, "{out}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(out, "", "nothing on stdout");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("error: cannot reach a flowline server at http://127.0.0.1:1:"),
        "{err}"
    );
    assert!(err.contains("refused"), "{err}");

    // Without the admin, a remote run is refused before anything is sent.
    let (ok, _, err, _) = run(
        &["demo", "--admin-email", "admin@example.com"],
        tmp.path(),
        Duration::from_secs(30),
    );
    assert!(!ok);
    assert!(err.contains("--url"), "{err}");
}

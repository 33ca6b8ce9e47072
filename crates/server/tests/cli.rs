//! The command line: global options, config layering, and the one-line errors
//! a bad setup gets (malformed config, unreachable database, corrupt or locked
//! data dir), each with a non-zero exit.

mod common;

use common::*;

/// The error is one actionable line (log lines, if any, are JSON).
fn error_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with('{')).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_owned()
}

#[test]
fn global_options_and_config_layers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d1");
    let cfg = dir.path().join("flowline.toml");
    std::fs::write(&cfg, "[server]\nlisten = \"127.0.0.1:9999\"\n[database]\nurl = \"postgres://app:s3cret@db.internal/flowline\"\n").unwrap();
    let c = cfg.to_str().unwrap();
    let dd = d.to_str().unwrap();
    for args in [
        vec!["--config", c, "--data-dir", dd, "config", "show"],
        vec!["config", "show", "--config", c, "--data-dir", dd],
        vec!["config", "--data-dir", dd, "show", "--config", c],
    ] {
        let (ok, out, err) = cli(&args, &[("FLOWLINE__EVENTLOG__PARTITIONS", "8")]);
        assert!(ok, "{args:?}: {err}");
        assert!(out.contains(&format!("data_dir = \"{dd}\"")), "{out}");
        assert!(
            out.contains("listen = \"127.0.0.1:9999\""),
            "file applied: {out}"
        );
        assert!(out.contains("partitions = 8"), "env applied: {out}");
        assert!(
            out.contains("postgres://app:***@db.internal/flowline"),
            "{out}"
        );
        assert!(!out.contains("s3cret"), "secret leaked: {out}");
    }
    let (ok, out, err) = cli(&["migrate", "--data-dir", dd], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("migrations applied (sqlite)"));
    assert!(d.join("eventlog.db").exists() && d.join("probe.db").exists());
}

#[test]
fn bad_setups_fail_fast_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let dd = d.to_str().unwrap();

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server\nlisten = ").unwrap();
    let (ok, _, err) = cli(
        &["serve", "--config", bad.to_str().unwrap(), "--data-dir", dd],
        &[],
    );
    assert!(!ok);
    let line = error_line(&err);
    assert!(
        line.contains("bad.toml") && line.contains("not valid TOML"),
        "{line}"
    );

    let (ok, _, err) = cli(
        &["serve", "--data-dir", dd],
        &[("FLOWLINE__SERVER__LISTN", "1")],
    );
    assert!(!ok);
    let line = error_line(&err);
    assert!(line.contains("`server.listn`"), "{line}");

    let (ok, _, err) = cli(
        &["serve", "--data-dir", dd],
        &[("FLOWLINE__EVENTLOG__PARTITIONS", "0")],
    );
    assert!(!ok);
    assert!(error_line(&err).contains("eventlog.partitions"), "{err}");

    let (ok, _, err) = cli(
        &["serve", "--data-dir", dd],
        &[("FLOWLINE__DATABASE__DURABILITY", "sometimes")],
    );
    assert!(!ok);
    assert!(error_line(&err).contains("database.durability"), "{err}");

    let start = std::time::Instant::now();
    let (ok, _, err) = cli(
        &["serve", "--data-dir", dd],
        &[(
            "FLOWLINE__DATABASE__URL",
            "postgres://flowline:pw@127.0.0.1:1/nowhere",
        )],
    );
    assert!(!ok);
    let line = error_line(&err);
    assert!(
        line.contains("cannot reach the database at postgres://flowline:***@127.0.0.1:1/nowhere"),
        "{line}"
    );
    assert!(!line.contains("pw@"), "{line}");
    assert!(start.elapsed().as_secs() < 15, "fails fast");

    let (ok, _, err) = cli(
        &["serve", "--data-dir", dd],
        &[("FLOWLINE__DATABASE__URL", "mysql://x")],
    );
    assert!(!ok);
    assert!(error_line(&err).contains("database.url"), "{err}");

    // Corrupt data file.
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("eventlog.db"), vec![0x42u8; 8192]).unwrap();
    let (ok, _, err) = cli(&["serve", "--data-dir", dd], &[]);
    assert!(!ok);
    let line = error_line(&err);
    assert!(
        line.contains("eventlog.db") && line.contains("not a valid SQLite database"),
        "{line}"
    );
    std::fs::remove_file(d.join("eventlog.db")).unwrap();

    // Data dir that is a file.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (ok, _, err) = cli(&["serve", "--data-dir", file.to_str().unwrap()], &[]);
    assert!(!ok);
    assert!(error_line(&err).contains("a-file"), "{err}");

    // Locked by a running server.
    let s = Server::start(&d, &[]);
    let (ok, _, err) = cli(&["serve", "--listen", "127.0.0.1:0", "--data-dir", dd], &[]);
    assert!(!ok);
    assert!(
        error_line(&err).contains("locked by another running flowline process"),
        "{err}"
    );
    assert!(s.terminate().success());
}

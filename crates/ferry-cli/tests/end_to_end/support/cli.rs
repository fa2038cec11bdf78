//! Running `ferry` commands to their end and reading what they print and write: what the
//! tests of `simulate`, `evaluate`, `privacy` and `bench` share.

use std::{path::Path, process::Output};

use serde_json::Value;

/// Runs `ferry args` to its end.
pub fn output(args: &[&str]) -> Output {
    super::ferry()
        .args(args)
        .output()
        .expect("the ferry binary starts")
}

/// What a finished command printed on its standard output.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a finished command printed on its standard error.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `ferry args`, requires success, and returns what it printed.
pub fn ferry_stdout(args: &[&str]) -> String {
    stdout(&super::run_ok(args))
}

/// The `history.json` a finished run wrote in `dir`.
pub fn written_history(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("history.json")).expect("history.json written");
    serde_json::from_str(&text).expect("history.json is JSON")
}

/// Runs `ferry simulate --out dir` with `extra` flags, requires success, and returns the
/// run's history.
pub fn simulate(dir: &Path, extra: &[&str]) -> Value {
    let out_dir = dir.to_str().expect("utf-8 path");
    let mut args = vec!["simulate", "--out", out_dir];
    args.extend_from_slice(extra);
    super::run_ok(&args);
    written_history(dir)
}

/// Requires `ferry args` to fail with exit code 1 and one line on standard error that
/// starts with `error: `, mentions `needle` and is no panic.
pub fn assert_clean_failure(args: &[&str], needle: &str) {
    let out = output(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected for {args:?}: {err}"
    );
    assert!(
        err.contains(needle),
        "{args:?} should mention {needle}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Logistic regression on the MNIST subset (fast), plus `extra` flags.
pub fn mnist_logreg<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--dataset", "mnist-subset", "--model", "logreg"];
    args.extend_from_slice(extra);
    args
}

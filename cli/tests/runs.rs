//! The binary starts and lists its commands. Also what makes `cargo test` build it, so that the
//! library's suite (`tests/suite/cli.rs`), which drives it as a user would, finds it.

use std::process::Command;

#[test]
fn help_lists_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_deep-pipelines"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for command in ["models", "featurize", "predict", "fit", "apply", "sql"] {
        assert!(help.contains(command), "`{command}` missing from:\n{help}");
    }
}

//! Records the git commit and target triple for `fieldsync --version`.
use std::process::Command;

fn main() {
    let commit = std::env::var("FIELDSYNC_GIT_COMMIT").ok().or_else(|| {
        Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    println!(
        "cargo:rustc-env=FIELDSYNC_GIT_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
    println!(
        "cargo:rustc-env=FIELDSYNC_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
    println!("cargo:rerun-if-env-changed=FIELDSYNC_GIT_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
}

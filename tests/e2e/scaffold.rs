//! `event-host new`, as the README's "Writing a handler" shows it: the
//! commands of its first code block, run as written (the binary on PATH)
//! for a Rust, a Python and a JavaScript project, then each project's own
//! `test.sh`.

use std::path::Path;
use std::process::Command;

use crate::process::run_to_end;
use crate::support::repo_root;

/// The README's handler commands: the first `sh` block after "## Writing
/// a handler", one command per line, comments dropped.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let section = readme
        .split("## Writing a handler")
        .nth(1)
        .expect("README has a \"Writing a handler\" section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the section starts with a sh block");
    block
        .lines()
        .map(|l| l.split(" #").next().unwrap_or(l).trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

fn sh(dir: &Path, command: &str) -> String {
    let binary = Path::new(env!("CARGO_BIN_EXE_event-host"));
    let path = format!(
        "{}:{}",
        binary.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", command])
        .current_dir(dir)
        .env("PATH", path)
        .env("EVENT_HOST", binary)
        // The guests' target folder: wit-bindgen is built once for both.
        .env("CARGO_TARGET_DIR", repo_root().join("guests/target"));
    let (ok, out, err) = run_to_end(cmd);
    let said = out + &err;
    assert!(ok, "`{command}` failed:\n{said}");
    said
}

fn project(lang: &str) {
    let commands = readme_commands();
    assert!(
        commands[0].starts_with("event-host new my-handler"),
        "{commands:?}"
    );
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("handlers")).unwrap();
    let mut replayed = None;
    for command in &commands {
        let command = if command.starts_with("event-host new") {
            format!("{command} --lang {lang}")
        } else {
            command.clone()
        };
        let said = sh(work.path(), &command);
        if command.starts_with("event-host check") {
            let manifest: serde_json::Value =
                serde_json::from_str(&said).expect("check prints JSON");
            assert_eq!(manifest["manifest"]["name"], "my-handler");
            assert_eq!(
                manifest["manifest"]["subscriptions"][0]["exchange"],
                "orders"
            );
        }
        if command.starts_with("event-host replay") {
            replayed = Some(said);
        }
    }
    let outcomes: Vec<String> = replayed
        .expect("the README replays")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["outcome"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(outcomes, ["ack", "reject"], "{lang}");
    assert!(work.path().join("handlers/my-handler.wasm").is_file());
    // The project's own test, as its README says.
    let said = sh(work.path(), "my-handler/test.sh");
    assert!(said.contains("test: ok"), "{said}");
}

#[test]
fn the_readme_s_handler_commands_work_in_rust_python_and_javascript() {
    if crate::backend::on_postgres() {
        // Nothing here touches a state backend: the SQLite pass ran it.
        return;
    }
    project("rust");
    project("python");
    project("javascript");
}

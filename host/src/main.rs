//! The `event-host` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    event_host::cli::run()
}

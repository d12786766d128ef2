//! The `event-host` binary: everything lives in the library.

/// Stack for every thread the process starts, unless the operator set
/// `RUST_MIN_STACK`. lapin parses AMQP header tables recursively on its own
/// I/O thread, at about 16 KiB of stack per nesting level: with the 2 MiB
/// default, a message whose headers nest ~130 levels (under 1 KiB, sent by
/// anyone who can publish) aborts the host, and its redelivery aborts the
/// restarted one. 256 MiB covers ~16k levels, near what a 128 KiB frame can
/// hold; it is address space, and only the pages a thread touches cost
/// memory.
const THREAD_STACK: &str = "268435456";

fn main() -> std::process::ExitCode {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // Before any thread exists, so nothing reads the environment
        // concurrently; std reads this once, at the first thread spawn.
        std::env::set_var("RUST_MIN_STACK", THREAD_STACK);
    }
    event_host::cli::run()
}

// JSON parsing shared by the guests that read JSON payloads. It is pulled
// in with `#[path]` rather than being a crate, so the workspace keeps
// exactly the five guest components and no guest gains a dependency.

use serde_json::Value;

/// The deepest `[`/`{` nesting a payload may have. serde_json parses (and
/// drops) nested values recursively, and the guests run on a 32 KiB shadow
/// stack (see `.cargo/config.toml`) that overflows somewhere past 64
/// levels. An overflow is a trap, which the host retries as if it were
/// transient; a payload that hostile should be rejected at once instead.
/// Real events nest a few levels at most.
pub const MAX_DEPTH: usize = 32;

/// Parses `payload` as JSON, refusing it before parsing when it nests
/// deeper than [`MAX_DEPTH`]. The error is a reason fit for a reject.
pub fn parse(payload: &[u8]) -> Result<Value, String> {
    check_depth(payload)?;
    serde_json::from_slice(payload).map_err(|e| format!("payload is not JSON: {e}"))
}

/// Refuses `payload` when it nests deeper than [`MAX_DEPTH`], without
/// parsing it.
pub fn check_depth(payload: &[u8]) -> Result<(), String> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in payload {
        if in_string {
            // Brackets inside strings are text, not nesting.
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("payload nests deeper than {MAX_DEPTH} levels"));
                }
            }
            // Unbalanced input is serde_json's to report, not ours.
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

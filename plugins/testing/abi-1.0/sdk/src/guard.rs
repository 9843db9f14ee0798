//! The panic guard every exported entry point runs in.

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::std_types::RResult;

use crate::{ErrorCode, PluginError};

/// Runs `f`, turning a panic into `PluginError { code: Panic }` whose message names the
/// plugin, the method and the panic payload.
pub fn guarded<T>(plugin: &str, method: &str, f: impl FnOnce() -> crate::Result<T>) -> RResult<T, PluginError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e),
        Err(payload) => RResult::RErr(PluginError::new(
            ErrorCode::Panic,
            format!("plugin `{plugin}` panicked in `{method}`: {}", payload_message(&*payload)),
        )),
    }
}

/// For entry points that cannot return an error (destructors, deleters): a panic is caught and
/// reported on stderr, never unwound into the host.
pub fn guarded_void(plugin: &str, method: &str, f: impl FnOnce()) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(f)) {
        eprintln!("plugin `{plugin}` panicked in `{method}` (ignored): {}", payload_message(&*payload));
    }
}

fn payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

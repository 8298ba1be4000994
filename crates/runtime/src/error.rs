//! Errors of the runtime's setup calls (engine, loading, linking). Failures of a guest while it
//! runs are not errors: they become HTTP responses or an [`crate::ExitStatus`].

use std::path::PathBuf;

/// Everything that can go wrong before a guest runs. Messages are meant to be shown to users as
/// they are (`shoal apply` prints them), so they name the component and say what was expected.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid runtime configuration: {0}")]
    Config(String),

    #[error("cannot set up the wasmtime engine: {0}")]
    Engine(String),

    #[error("cannot create the compilation cache directory {path}: {source}")]
    CacheDir {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot read component {digest} from {path}: {source}")]
    ReadWasm {
        digest: String,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot compile component {digest}: {message}")]
    Compile { digest: String, message: String },

    #[error(
        "component {digest} does not export wasi:http/incoming-handler@0.2: kind \"http\" needs a \
         wasi:http/proxy component (it exports {exports})"
    )]
    NotHttp { digest: String, exports: String },

    #[error(
        "component {digest} does not export wasi:cli/run@0.2: kinds \"job\" and \"daemon\" need a \
         wasi:cli/command component (it exports {exports})"
    )]
    NotCommand { digest: String, exports: String },

    #[error("cannot link component {digest}: {message}")]
    Link { digest: String, message: String },

    #[error("invalid instance configuration for component {digest}: {message}")]
    Instance { digest: String, message: String },

    #[error("internal runtime error: {0}")]
    Internal(String),
}

//! Upload validation: decide what a blob of bytes is before it is accepted,
//! so bad input is refused at the door with a message, not at deploy time.

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WasmKind {
    Component,
    Module,
}

impl std::fmt::Display for WasmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WasmKind::Component => "component",
            WasmKind::Module => "module",
        })
    }
}

#[derive(Debug, Error)]
pub enum WasmError {
    #[error("not a WebAssembly binary (it does not start with the \\0asm magic bytes)")]
    NotWasm,
    #[error("invalid WebAssembly {kind}: {message}")]
    Invalid { kind: WasmKind, message: String },
}

/// Tells a component from a core module by its header, then fully validates it.
pub fn validate(bytes: &[u8]) -> Result<WasmKind, WasmError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(WasmError::NotWasm);
    }
    let kind = if bytes[6..8] == [1, 0] {
        WasmKind::Component
    } else {
        WasmKind::Module
    };
    let mut validator = wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all());
    validator
        .validate_all(bytes)
        .map_err(|e| WasmError::Invalid {
            kind,
            message: e.to_string(),
        })?;
    Ok(kind)
}

/// The names a component exports at its top level (`wasi:http/incoming-handler@0.2.6`,
/// `wasi:cli/run@0.2.0`…), which say what it can run as; none for a core module. Only for
/// bytes [`validate`] took.
pub fn component_exports(bytes: &[u8]) -> Vec<String> {
    let mut exports = Vec::new();
    // Nested modules and components come in between, each ended by its own `End`.
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload {
            Ok(wasmparser::Payload::ModuleSection { .. })
            | Ok(wasmparser::Payload::ComponentSection { .. }) => depth += 1,
            Ok(wasmparser::Payload::End(_)) => depth = depth.saturating_sub(1),
            Ok(wasmparser::Payload::ComponentExportSection(section)) if depth == 0 => {
                exports.extend(
                    section
                        .into_iter()
                        .flatten()
                        .map(|e| e.name.name.to_string()),
                );
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    exports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_wasm() {
        assert!(matches!(validate(b"hello world!"), Err(WasmError::NotWasm)));
        assert!(matches!(validate(b""), Err(WasmError::NotWasm)));
    }

    #[test]
    fn empty_core_module_is_a_module() {
        let empty = [0, b'a', b's', b'm', 1, 0, 0, 0];
        assert_eq!(validate(&empty).unwrap(), WasmKind::Module);
    }

    #[test]
    fn empty_component_is_a_component() {
        let empty = [0, b'a', b's', b'm', 0x0d, 0, 1, 0];
        assert_eq!(validate(&empty).unwrap(), WasmKind::Component);
        assert_eq!(component_exports(&empty), Vec::<String>::new());
    }

    #[test]
    fn truncated_module_is_invalid() {
        let bad = [0, b'a', b's', b'm', 1, 0, 0, 0, 1, 5, 1];
        assert!(matches!(validate(&bad), Err(WasmError::Invalid { .. })));
    }
}

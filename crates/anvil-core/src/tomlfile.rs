//! Shared TOML decoding: errors that carry the dotted path of the key that failed.

use serde::de::DeserializeOwned;

/// A decoding failure: the dotted key path (empty for the document root) and toml's message,
/// which includes line, column and the offending source line.
#[derive(Debug)]
pub(crate) struct DecodeError {
    pub key: Option<String>,
    pub message: String,
}

pub(crate) fn decode<T: DeserializeOwned>(text: &str) -> Result<T, DecodeError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let key = (path != "." && !path.is_empty()).then_some(path);
        DecodeError {
            key,
            message: e.into_inner().to_string().trim_end().to_string(),
        }
    })
}

//! Errors of the shared domain layer.

#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    /// A request or config field is out of range or missing.
    #[error("invalid {field}: {message}")]
    InvalidField { field: String, message: String },
    /// An object-store URL that cannot be used.
    #[error("{url}: {message}")]
    Storage { url: String, message: String },
}

impl CommonError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }
}

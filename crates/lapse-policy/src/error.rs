use std::path::PathBuf;

/// Why a policy folder could not be loaded. Each variant names the file and, where
/// Cedar reports one, the line.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy folder `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: {message}")]
    Schema { file: String, message: String },
    #[error(
        "{file}:{line}:{column}: policy `{policy}` does not validate against the schema: {message}"
    )]
    Validation {
        file: String,
        line: usize,
        column: usize,
        policy: String,
        message: String,
    },
    #[error("{file}:{line}: policy `{policy}`: {message}")]
    Annotation {
        file: String,
        line: usize,
        policy: String,
        message: String,
    },
    #[error("{file}: duplicate policy id `{policy}` (also in {other})")]
    DuplicateId {
        file: String,
        policy: String,
        other: String,
    },
    #[error("policy folder `{0}` holds no `.cedar` policies")]
    Empty(String),
}

/// 1-based line and column of a byte offset in `text`.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let upto = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = upto.matches('\n').count() + 1;
    let column = upto
        .rfind('\n')
        .map_or(upto.len(), |nl| upto.len() - nl - 1)
        + 1;
    (line, column)
}

/// The first labelled offset of a diagnostic, if it has one.
pub(crate) fn first_offset(diag: &dyn miette::Diagnostic) -> Option<usize> {
    diag.labels()
        .and_then(|mut l| l.next())
        .map(|span| span.offset())
}

/// A diagnostic's message with its help, on one line.
pub(crate) fn message(diag: &dyn miette::Diagnostic) -> String {
    let mut msg = diag.to_string();
    if let Some(help) = diag.help() {
        msg.push_str(&format!(" (help: {help})"));
    }
    msg
}

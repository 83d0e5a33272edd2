//! Errors in the files an operator writes (plans, the cluster file): each names the file, the
//! line and column, and the field, so that the operator can go straight to it.

use std::ops::Range;

/// An error in an operator's file: where (file, line, column, field) and what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {field}: {message}")]
pub struct FileError {
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted path of the field, e.g. `thresholds.lag_max` or `coordinators[1].address`.
    pub field: String,
    pub message: String,
}

impl FileError {
    /// An error at byte range `span` of `text` (the file's whole text).
    pub fn at(file: &str, text: &str, span: Range<usize>, field: String, message: String) -> FileError {
        let start = span.start.min(text.len());
        // A span may fall inside a multi-byte character only if the parser says so; never panic.
        let start = (0..=start).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let before = &text[..start];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        FileError { file: file.to_string(), line, column, field, message }
    }

    /// The error `toml` reports for text that does not parse into the expected shape.
    pub fn from_toml(file: &str, text: &str, e: &toml::de::Error) -> FileError {
        let span = e.span().unwrap_or(0..0);
        let message = e.message().to_string();
        let field = backticked(&message).unwrap_or_else(|| "-".to_string());
        FileError::at(file, text, span, field, message)
    }
}

/// A file being validated: its name and text, to point an error at a span of it.
#[derive(Clone, Copy)]
pub(crate) struct Source<'a> {
    pub(crate) file: &'a str,
    pub(crate) text: &'a str,
}

impl Source<'_> {
    /// An error at byte range `span`, naming `field`.
    pub(crate) fn error<T>(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Result<T, FileError> {
        Err(FileError::at(self.file, self.text, span, field.into(), message.into()))
    }
}

/// The first `backticked` word of a message (the field `toml` names).
fn backticked(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

//! The one error type of this crate: every variant names the file, line or field to fix.

use std::path::PathBuf;

/// Everything that can go wrong while reading wheel data, predictions or talking to an LLM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of the wheel directory (or the predictions file) does not exist or cannot be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A wheel file that the benchmark needs is absent from the wheel directory.
    #[error("missing wheel file {path} (the wheel directory must hold format.csv, synonym.xlsx and wheel1.xlsx .. wheel5.xlsx)")]
    MissingWheelFile { path: PathBuf },

    /// An `.xlsx` file could not be opened or has no worksheet.
    #[error("cannot read spreadsheet {path}: {message}")]
    Spreadsheet { path: PathBuf, message: String },

    /// `format.csv` is not valid CSV.
    #[error("cannot read {path}: {message}")]
    Csv { path: PathBuf, message: String },

    /// A required column header is absent.
    #[error("{path}: column `{column}` not found (header has: {found})")]
    MissingColumn {
        path: PathBuf,
        column: String,
        found: String,
    },

    /// A spreadsheet cell holds something other than text where the benchmark expects a word.
    #[error("{path}: cell {cell} (column `{column}`) must be text, found {found}")]
    CellNotText {
        path: PathBuf,
        cell: String,
        column: String,
        found: String,
    },

    /// A predictions line is not a JSON object of the expected shape.
    #[error("{source_name} line {line}: {message}")]
    BadLine {
        source_name: String,
        line: usize,
        message: String,
    },

    /// A predictions line names a dataset that is not one of the nine MER-UniBench sets.
    #[error("{source_name} line {line}: unknown dataset `{name}` (expected one of: {expected})")]
    UnknownDataset {
        source_name: String,
        line: usize,
        name: String,
        expected: String,
    },

    /// The same `id` appears twice within one dataset.
    #[error("{source_name} line {line}: duplicate id `{id}` in dataset {dataset} (first seen on line {first_line})")]
    DuplicateId {
        source_name: String,
        line: usize,
        id: String,
        dataset: String,
        first_line: usize,
    },

    /// The predictions file holds no sample at all.
    #[error("{source_name}: no predictions (the file is empty)")]
    NoPredictions { source_name: String },

    /// The LLM extraction endpoint failed or answered something unusable.
    #[error("LLM extraction via {url}: {message}")]
    Llm { url: String, message: String },

    /// A line of the extraction cache is not valid.
    #[error("extraction cache {path} line {line}: {message}")]
    BadCache {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Shorthand for this crate's results.
pub type Result<T> = std::result::Result<T, Error>;

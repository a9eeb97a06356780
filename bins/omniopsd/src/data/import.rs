//! `omniopsd data import`: a manifest from a dataset's own labels file and media folder.
//!
//! A labels file is a CSV or TSV with a header row, a JSON array of objects, or JSONL (one
//! object a line). Each row becomes one manifest line: `id`, `video` and `audio` are templates
//! over the row's columns (`dia{Dialogue_ID}_utt{Utterance_ID}.mp4`), the label fields name a
//! column each, and the split is fixed or read from a column through a mapping.
//!
//! Invariant: nothing is written unless every row imports (each error names the labels file,
//! its row and the column or file); the manifest is written atomically, never over an existing
//! file without `--force`, and every record passes the same label checks as `data check`
//! ([`super::datasets::check_labels`]). Media files must exist; decoding them is `data
//! check`'s job.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::Value;

use super::datasets;
use super::manifest::{write_manifest, Record, Split};

/// Arguments of `data import`.
#[derive(Debug, Args)]
#[command(
    after_help = "Templates put a column's value where its name is in braces: \
--id 'dia{Dialogue_ID}_utt{Utterance_ID}'. Media paths are relative to --media; the manifest \
stores them relative to its own directory when they lie under it, else absolute."
)]
pub struct ImportArgs {
    /// The labels file: .csv, .tsv, .json (an array of objects) or .jsonl.
    #[arg(long, value_name = "FILE")]
    pub labels: PathBuf,
    /// The folder the media templates are relative to.
    #[arg(long, value_name = "DIR")]
    pub media: PathBuf,
    /// The manifest to write.
    #[arg(long, value_name = "FILE.jsonl")]
    pub out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    pub force: bool,
    /// The dataset of every sample: one of MER-UniBench's nine names, or another name.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Template of the sample id.
    #[arg(long, value_name = "TEMPLATE")]
    pub id: String,
    /// Template of the video file (or frames directory), relative to --media.
    #[arg(long, value_name = "TEMPLATE")]
    pub video: String,
    /// Template of a separate audio file, relative to --media (default: the video's track).
    #[arg(long, value_name = "TEMPLATE")]
    pub audio: Option<String>,
    /// Column of the subtitle (the spoken words).
    #[arg(long, value_name = "COLUMN")]
    pub subtitle: String,
    /// Column of the basic-emotion label (lower-cased on import).
    #[arg(long, value_name = "COLUMN")]
    pub emotion: Option<String>,
    /// Renames emotion labels after lower-casing: `exc=happy,hap=happy`.
    #[arg(long, value_name = "FROM=TO,...")]
    pub emotion_map: Option<String>,
    /// Column of the sentiment score.
    #[arg(long, value_name = "COLUMN")]
    pub sentiment: Option<String>,
    /// Column of the open-vocabulary labels (a JSON list, or a comma-separated string).
    #[arg(long, value_name = "COLUMN")]
    pub openset: Option<String>,
    /// Column of the rationale, when the labels file has one.
    #[arg(long, value_name = "COLUMN")]
    pub rationale: Option<String>,
    /// The split of every sample (without --split-column).
    #[arg(
        long,
        value_enum,
        default_value = "heldout",
        conflicts_with = "split_column"
    )]
    pub split: SplitValue,
    /// Column holding each row's split, read through --split-map.
    #[arg(long, value_name = "COLUMN", requires = "split_map")]
    pub split_column: Option<String>,
    /// The column's values as splits: `train=train,valid=train,test=heldout`; a value not
    /// listed is an error naming the row.
    #[arg(long, value_name = "VALUE=SPLIT,...")]
    pub split_map: Option<String>,
}

/// A split named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitValue {
    Train,
    Heldout,
}

impl From<SplitValue> for Split {
    fn from(s: SplitValue) -> Split {
        match s {
            SplitValue::Train => Split::Train,
            SplitValue::Heldout => Split::Heldout,
        }
    }
}

/// One labels-file row: its 1-based position (a CSV's data rows count from the line after
/// the header) and its columns as text.
struct Row {
    line: usize,
    cells: BTreeMap<String, String>,
}

/// Reads the labels file's rows.
fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let bytes = fs::read(path).with_context(|| format!("reading labels {}", path.display()))?;
    let text =
        String::from_utf8(bytes).map_err(|e| anyhow!("{}: not UTF-8 ({e})", path.display()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "csv" | "tsv" => {
            let mut reader = csv::ReaderBuilder::new()
                .delimiter(if ext == "tsv" { b'\t' } else { b',' })
                .from_reader(text.as_bytes());
            let header: Vec<String> = reader
                .headers()
                .with_context(|| format!("{}: reading the header row", path.display()))?
                .iter()
                .map(|h| h.trim().to_string())
                .collect();
            let mut rows = Vec::new();
            for record in reader.records() {
                let record = record.with_context(|| format!("{}", path.display()))?;
                let line = record.position().map_or(0, |p| p.line() as usize);
                let cells = header
                    .iter()
                    .cloned()
                    .zip(record.iter().map(str::to_string))
                    .collect();
                rows.push(Row { line, cells });
            }
            Ok(rows)
        }
        "json" => {
            let value: Value = serde_json::from_str(text)
                .with_context(|| format!("{}: not valid JSON", path.display()))?;
            let Value::Array(items) = value else {
                bail!("{}: expected a JSON array of objects", path.display());
            };
            items
                .iter()
                .enumerate()
                .map(|(i, v)| object_row(v, i + 1, path, "item"))
                .collect()
        }
        "jsonl" => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v: Value = serde_json::from_str(l)
                    .with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
                object_row(&v, i + 1, path, "line")
            })
            .collect(),
        _ => bail!(
            "{}: a labels file is .csv, .tsv, .json or .jsonl",
            path.display()
        ),
    }
}

fn object_row(value: &Value, line: usize, path: &Path, what: &str) -> Result<Row> {
    let Value::Object(map) = value else {
        bail!("{} {what} {line}: expected a JSON object", path.display());
    };
    let cells = map
        .iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect();
    Ok(Row { line, cells })
}

impl Row {
    fn get(&self, column: &str) -> Result<&str> {
        self.cells.get(column).map(String::as_str).ok_or_else(|| {
            anyhow!(
                "no column `{column}` (columns: {})",
                self.cells.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// `template` with each `{column}` replaced by the row's value.
    fn fill(&self, template: &str) -> Result<String> {
        let mut out = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| anyhow!("template `{template}` has a `{{` without `}}`"))?;
            out.push_str(self.get(&after[..close])?.trim());
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// `a=b,c=d` as pairs; `what` names the flag in errors.
fn pairs(text: &str, what: &str) -> Result<BTreeMap<String, String>> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (from, to) = p
                .split_once('=')
                .ok_or_else(|| anyhow!("{what}: `{p}` is not FROM=TO"))?;
            Ok((from.trim().to_string(), to.trim().to_string()))
        })
        .collect()
}

/// Runs `data import`.
pub fn run(args: ImportArgs) -> Result<()> {
    if args.out.exists() && !args.force {
        bail!(
            "{} already exists; pass --force to replace it",
            args.out.display()
        );
    }
    if args.emotion.is_none() && args.sentiment.is_none() && args.openset.is_none() {
        bail!("name at least one label column: --emotion, --sentiment or --openset");
    }
    let emotion_map = match &args.emotion_map {
        Some(m) => pairs(&m.to_lowercase(), "--emotion-map")?,
        None => BTreeMap::new(),
    };
    let split_map = match &args.split_map {
        Some(m) => pairs(m, "--split-map")?
            .into_iter()
            .map(|(from, to)| match to.as_str() {
                "train" => Ok((from, Split::Train)),
                "heldout" => Ok((from, Split::Heldout)),
                other => bail!("--split-map: `{other}` is not a split (train, heldout)"),
            })
            .collect::<Result<BTreeMap<_, _>>>()?,
        None => BTreeMap::new(),
    };
    let rows = read_rows(&args.labels)?;
    if rows.is_empty() {
        bail!("{}: no rows", args.labels.display());
    }
    let out_dir = match args.out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let out_abs = fs::canonicalize(&out_dir).ok();
    let media_abs = fs::canonicalize(&args.media)
        .with_context(|| format!("--media {}", args.media.display()))?;
    let mut records = Vec::with_capacity(rows.len());
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for row in &rows {
        let at = || format!("{} row at line {}", args.labels.display(), row.line);
        let record = import_row(&args, row, &emotion_map, &split_map, &media_abs, &out_abs)
            .with_context(at)?;
        if let Some(first) = seen.insert(record.id.clone(), row.line) {
            bail!(
                "{}: id `{}` already given by the row at line {first}",
                at(),
                record.id
            );
        }
        let problems = datasets::check_labels(&record);
        if !problems.is_empty() {
            bail!("{}: {}", at(), problems.join("; "));
        }
        records.push(record);
    }
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    write_manifest(&args.out, &records)?;
    let train = records.iter().filter(|r| r.split == Split::Train).count();
    eprintln!(
        "{}: {} samples ({train} train, {} held-out){}",
        args.out.display(),
        records.len(),
        records.len() - train,
        args.dataset
            .as_ref()
            .map(|d| format!(" of {d}"))
            .unwrap_or_default()
    );
    Ok(())
}

fn import_row(
    args: &ImportArgs,
    row: &Row,
    emotion_map: &BTreeMap<String, String>,
    split_map: &BTreeMap<String, Split>,
    media: &Path,
    out_dir: &Option<PathBuf>,
) -> Result<Record> {
    let path_of = |template: &str| -> Result<String> {
        let file = media.join(row.fill(template)?);
        if !file.exists() {
            bail!("media file {} does not exist", file.display());
        }
        Ok(
            match out_dir.as_ref().and_then(|d| file.strip_prefix(d).ok()) {
                Some(relative) => relative.display().to_string(),
                None => file.display().to_string(),
            },
        )
    };
    let split = match &args.split_column {
        Some(column) => {
            let value = row.get(column)?.trim();
            *split_map.get(value).ok_or_else(|| {
                anyhow!("column `{column}` is `{value}`, which --split-map does not list")
            })?
        }
        None => args.split.into(),
    };
    let emotion = match &args.emotion {
        Some(column) => {
            let label = row.get(column)?.trim().to_lowercase();
            Some(emotion_map.get(&label).cloned().unwrap_or(label))
        }
        None => None,
    };
    let sentiment = match &args.sentiment {
        Some(column) => {
            let text = row.get(column)?.trim();
            Some(text.parse::<f64>().map_err(|_| {
                anyhow!("column `{column}` is `{text}`, not a number (the sentiment score)")
            })?)
        }
        None => None,
    };
    let openset = match &args.openset {
        Some(column) => {
            let text = row.get(column)?.trim();
            let labels: Vec<String> = match serde_json::from_str::<Vec<String>>(text) {
                Ok(list) => list,
                Err(_) => text
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .split(',')
                    .map(|w| w.trim().trim_matches(['\'', '"']).to_string())
                    .filter(|w| !w.is_empty())
                    .collect(),
            };
            Some(labels)
        }
        None => None,
    };
    let id = row.fill(&args.id)?;
    if id.trim().is_empty() {
        bail!("the id template `{}` gives an empty id", args.id);
    }
    Ok(Record {
        id,
        split,
        dataset: args.dataset.clone(),
        audio: args.audio.as_deref().map(path_of).transpose()?,
        video: path_of(&args.video)?,
        subtitle: row.get(&args.subtitle)?.trim().to_string(),
        rationale: match &args.rationale {
            Some(column) => Some(row.get(column)?.trim().to_string()).filter(|r| !r.is_empty()),
            None => None,
        },
        rationale_model: None,
        rationale_prompt: None,
        emotion,
        sentiment,
        openset,
        conflict: None,
    })
}

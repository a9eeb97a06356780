//! The emotion-wheel data and the label mapping of MER-UniBench (README steps 3 to 6).
//!
//! Reference: AffectGPT (Lian et al., ICML 2025), `my_affectgpt/evaluation/wheel.py`:
//! `read_format2raws`, `read_candidate_synonym_merge`, `func_get_wheel_cluster(level1)` and
//! `func_backward_case3`. The files are read as the authors publish them (`format.csv`,
//! `synonym.xlsx`, `wheel1.xlsx` .. `wheel5.xlsx`), with pandas' reading rules where they matter:
//! a cell spelled like a pandas missing value (`NA`, `null`, `nan`, ...) counts as blank.
//!
//! The crate ships a byte-identical copy of the seven files (`bins/mer/data/`, compiled in with
//! `include_bytes!`), so scoring needs nothing beside the binary: [`EmotionWheels::shipped`].
//! A directory given by the user ([`EmotionWheels::load`]) replaces it.

use std::collections::{BTreeSet, HashMap};
use std::io::Cursor;
use std::path::{Path, PathBuf};

use calamine::{Data, Reader, Xlsx};

use crate::error::{Error, Result};
use crate::labels::{py_strip, string_to_list};

/// Number of emotion wheels the benchmark averages over.
pub const N_WHEELS: usize = 5;

/// Number of synonym runs (`word_runK` / `synonym_runK`) in `synonym.xlsx`.
pub const N_SYNONYM_RUNS: usize = 8;

/// The file names the wheel directory must hold.
pub const WHEEL_FILES: [&str; 7] = [
    "format.csv",
    "synonym.xlsx",
    "wheel1.xlsx",
    "wheel2.xlsx",
    "wheel3.xlsx",
    "wheel4.xlsx",
    "wheel5.xlsx",
];

/// The shipped copy of the benchmark's files, in the order of [`WHEEL_FILES`]: the bytes its
/// authors publish, unchanged (`bins/mer/data/README.md` says where from).
pub const SHIPPED_FILES: [(&str, &[u8]); 7] = [
    ("format.csv", include_bytes!("../data/format.csv")),
    ("synonym.xlsx", include_bytes!("../data/synonym.xlsx")),
    ("wheel1.xlsx", include_bytes!("../data/wheel1.xlsx")),
    ("wheel2.xlsx", include_bytes!("../data/wheel2.xlsx")),
    ("wheel3.xlsx", include_bytes!("../data/wheel3.xlsx")),
    ("wheel4.xlsx", include_bytes!("../data/wheel4.xlsx")),
    ("wheel5.xlsx", include_bytes!("../data/wheel5.xlsx")),
];

/// What errors in the shipped files name in place of a directory (they are compiled in, so
/// an error there is a bug of this crate, not of the user's setup).
pub const SHIPPED_ORIGIN: &str = "<shipped MER-UniBench data>";

/// Strings pandas' `read_csv` / `read_excel` turn into NaN by default (`keep_default_na=True`).
const PANDAS_NA: [&str; 19] = [
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
];

fn pandas_cell(s: &str) -> Option<&str> {
    if PANDAS_NA.contains(&s) {
        None
    } else {
        Some(s)
    }
}

/// One emotion wheel, in the nested order `wheel.py`'s `read_wheel_to_map` builds it:
/// level-1 groups in order of first appearance, each with its level-2 groups in order of first
/// appearance, each with its level-3 words in row order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WheelTree {
    pub groups: Vec<(String, Vec<(String, Vec<String>)>)>,
}

impl WheelTree {
    /// Builds the tree from the rows of `level1`, `level2`, `level3` cells.
    ///
    /// A blank cell repeats the value above it (each column on its own, starting from the empty
    /// string); every value is lower-cased and stripped.
    pub fn from_rows<I, S>(rows: I) -> WheelTree
    where
        I: IntoIterator<Item = [Option<S>; 3]>,
        S: AsRef<str>,
    {
        let mut tree = WheelTree::default();
        let mut current = [String::new(), String::new(), String::new()];
        for row in rows {
            for (value, cell) in current.iter_mut().zip(row.iter()) {
                if let Some(cell) = cell {
                    *value = cell.as_ref().to_string();
                }
                // The reference lower-cases then strips the carried value on every row.
                *value = py_strip(&value.to_lowercase()).to_string();
            }
            let [l1, l2, l3] = &current;
            let group = match tree.groups.iter().position(|(name, _)| name == l1) {
                Some(i) => &mut tree.groups[i].1,
                None => {
                    tree.groups.push((l1.clone(), Vec::new()));
                    &mut tree.groups.last_mut().expect("just pushed").1
                }
            };
            match group.iter().position(|(name, _)| name == l2) {
                Some(i) => group[i].1.push(l3.clone()),
                None => group.push((l2.clone(), vec![l3.clone()])),
            }
        }
        tree
    }

    /// Every level-1, level-2 and level-3 word mapped to its level-1 word
    /// (`func_get_wheel_cluster(level="level1")`); later assignments win, in tree order.
    pub fn level1_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::new();
        for (l1, children) in &self.groups {
            map.insert(l1.clone(), l1.clone());
            for (l2, leaves) in children {
                map.insert(l2.clone(), l1.clone());
                for l3 in leaves {
                    map.insert(l3.clone(), l1.clone());
                }
            }
        }
        map
    }
}

/// All mapping tables of the benchmark, ready to map labels onto the five wheels.
#[derive(Debug, Clone)]
pub struct EmotionWheels {
    /// Step 3: a word form -> every `name` of `format.csv` it is a form of (in file order).
    format_map: HashMap<String, Vec<String>>,
    /// Step 4: a word or synonym -> the union over the eight runs of the words it stands for.
    synonym_map: HashMap<String, BTreeSet<String>>,
    /// Step 5: per wheel, a word of any level -> its level-1 word.
    wheels: Vec<HashMap<String, String>>,
}

/// One row of `format.csv`: a `name` and its `format` cell (a label-list string, may be blank).
pub type FormatRow = (String, String);

/// One row of one synonym run: the `word` cell and the `synonym` cell (blank cells are `None`).
pub type SynonymRow = (Option<String>, Option<String>);

impl EmotionWheels {
    /// Reads `format.csv`, `synonym.xlsx` and `wheel1..5.xlsx` from `dir`.
    pub fn load(dir: &Path) -> Result<EmotionWheels> {
        for name in WHEEL_FILES {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(Error::MissingWheelFile { path });
            }
        }
        let mut files = Vec::with_capacity(WHEEL_FILES.len());
        for name in WHEEL_FILES {
            let path = dir.join(name);
            files.push(std::fs::read(&path).map_err(|e| io_error(&path, e))?);
        }
        EmotionWheels::from_files(dir, |i| &files[i])
    }

    /// The wheels of the copy compiled into this crate ([`SHIPPED_FILES`]).
    pub fn shipped() -> Result<EmotionWheels> {
        EmotionWheels::from_files(Path::new(SHIPPED_ORIGIN), |i| SHIPPED_FILES[i].1)
    }

    /// [`EmotionWheels::load`] from `dir` when given, else [`EmotionWheels::shipped`].
    pub fn load_or_shipped(dir: Option<&Path>) -> Result<EmotionWheels> {
        match dir {
            Some(dir) => EmotionWheels::load(dir),
            None => EmotionWheels::shipped(),
        }
    }

    /// Parses the seven files, `bytes(i)` being the content of `WHEEL_FILES[i]`; errors name
    /// them as `origin/<file>`.
    fn from_files<'a>(origin: &Path, bytes: impl Fn(usize) -> &'a [u8]) -> Result<EmotionWheels> {
        let format_rows = parse_format_csv(bytes(0), &origin.join(WHEEL_FILES[0]))?;
        let synonym_runs = parse_synonym_xlsx(bytes(1), &origin.join(WHEEL_FILES[1]))?;
        let mut wheels = Vec::with_capacity(N_WHEELS);
        for k in 0..N_WHEELS {
            wheels.push(parse_wheel_xlsx(
                bytes(2 + k),
                &origin.join(WHEEL_FILES[2 + k]),
            )?);
        }
        Ok(EmotionWheels::from_tables(
            &format_rows,
            &synonym_runs,
            &wheels,
        ))
    }

    /// Builds the tables from already-read rows (steps 3 to 5 of the README).
    pub fn from_tables(
        format_rows: &[FormatRow],
        synonym_runs: &[Vec<SynonymRow>],
        wheels: &[WheelTree],
    ) -> EmotionWheels {
        let mut format_map: HashMap<String, Vec<String>> = HashMap::new();
        for (name, format) in format_rows {
            for form in string_to_list(format) {
                format_map.entry(form).or_default().push(name.clone());
            }
            format_map
                .entry(name.clone())
                .or_default()
                .push(name.clone());
        }

        let mut synonym_map: HashMap<String, BTreeSet<String>> = HashMap::new();
        for run in synonym_runs {
            for (word, synonyms) in run {
                // The reference cannot read a run whose word cell is blank (NaN has no
                // `.strip()`); such a row carries no mapping, so it is skipped.
                let Some(word) = word else { continue };
                let word = py_strip(word).to_lowercase();
                synonym_map
                    .entry(word.clone())
                    .or_default()
                    .insert(word.clone());
                for synonym in string_to_list(synonyms.as_deref().unwrap_or("")) {
                    let synonym = py_strip(&synonym).to_lowercase();
                    synonym_map.entry(synonym).or_default().insert(word.clone());
                }
            }
        }

        EmotionWheels {
            format_map,
            synonym_map,
            wheels: wheels.iter().map(WheelTree::level1_map).collect(),
        }
    }

    /// Number of wheels loaded (five for the benchmark's data).
    pub fn n_wheels(&self) -> usize {
        self.wheels.len()
    }

    /// Step 6: maps one normalised label onto wheel `wheel` (0-based), `None` when dropped.
    ///
    /// `level1(label) = W[min_sorted({ s | n in F[label], s in S[n] } ∩ dom W)]` where `F` is the
    /// `format.csv` map, `S` the merged synonym map and `W` the wheel's level-1 map
    /// (`func_backward_case3`). A name missing from `S` contributes nothing (the reference
    /// raises a `KeyError` there; the published data has none).
    pub fn map_label(&self, label: &str, wheel: usize) -> Option<&str> {
        let names = self.format_map.get(label)?;
        let wheel_map = self.wheels.get(wheel)?;
        let mut words: Vec<&str> = names
            .iter()
            .filter_map(|name| self.synonym_map.get(name))
            .flatten()
            .map(String::as_str)
            .collect();
        words.sort_unstable();
        words
            .into_iter()
            .find_map(|word| wheel_map.get(word))
            .map(String::as_str)
    }

    /// Maps a list of normalised labels onto wheel `wheel` and keeps the distinct results.
    pub fn map_set(&self, labels: &[String], wheel: usize) -> BTreeSet<&str> {
        labels
            .iter()
            .filter_map(|label| self.map_label(label, wheel))
            .collect()
    }
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads `format.csv` (columns `name`, `format`) as pandas would.
pub fn read_format_csv(path: &Path) -> Result<Vec<FormatRow>> {
    let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
    parse_format_csv(&bytes, path)
}

/// Parses the bytes of a `format.csv`; `path` is what errors name.
pub fn parse_format_csv(bytes: &[u8], path: &Path) -> Result<Vec<FormatRow>> {
    let mut reader = csv::ReaderBuilder::new().from_reader(bytes);
    let csv_error = |e: csv::Error| Error::Csv {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let headers = reader.headers().map_err(csv_error)?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| Error::MissingColumn {
                path: path.to_path_buf(),
                column: name.to_string(),
                found: headers.iter().collect::<Vec<_>>().join(", "),
            })
    };
    let (name_col, format_col) = (column("name")?, column("format")?);
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let cell = |i: usize| {
            pandas_cell(record.get(i).unwrap_or(""))
                .unwrap_or("")
                .to_string()
        };
        rows.push((cell(name_col), cell(format_col)));
    }
    Ok(rows)
}

/// A first-sheet table: header names and, per data row, the text cells (blank = `None`).
struct Sheet {
    path: PathBuf,
    header: Vec<String>,
    /// (absolute 0-based row index, cells)
    rows: Vec<(u32, Vec<Data>)>,
    first_col: u32,
}

impl Sheet {
    /// Reads the first worksheet of the `.xlsx` file whose bytes are `bytes`; `path` is what
    /// errors name.
    fn parse(bytes: &[u8], path: &Path) -> Result<Sheet> {
        let spreadsheet_error = |message: String| Error::Spreadsheet {
            path: path.to_path_buf(),
            message,
        };
        let mut workbook = Xlsx::new(Cursor::new(bytes))
            .map_err(|e: calamine::XlsxError| spreadsheet_error(e.to_string()))?;
        let range = workbook
            .worksheet_range_at(0)
            .ok_or_else(|| spreadsheet_error("the workbook has no worksheet".into()))?
            .map_err(|e| spreadsheet_error(e.to_string()))?;
        let (first_row, first_col) = range.start().unwrap_or((0, 0));
        let mut rows = range.rows();
        let header = rows
            .next()
            .ok_or_else(|| spreadsheet_error("the first worksheet is empty".into()))?
            .iter()
            .map(|cell| match cell {
                Data::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        let rows = rows
            .enumerate()
            .map(|(i, row)| (first_row + 1 + i as u32, row.to_vec()))
            .collect();
        Ok(Sheet {
            path: path.to_path_buf(),
            header,
            rows,
            first_col,
        })
    }

    fn column(&self, name: &str) -> Result<usize> {
        self.header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| Error::MissingColumn {
                path: self.path.clone(),
                column: name.to_string(),
                found: self.header.join(", "),
            })
    }

    /// The text of a cell, `None` when blank (or a pandas missing-value spelling).
    fn text(&self, row: &(u32, Vec<Data>), col: usize, column: &str) -> Result<Option<String>> {
        match row.1.get(col).unwrap_or(&Data::Empty) {
            Data::Empty => Ok(None),
            Data::String(s) => Ok(pandas_cell(s).map(str::to_string)),
            other => Err(Error::CellNotText {
                path: self.path.clone(),
                cell: cell_name(row.0, self.first_col + col as u32),
                column: column.to_string(),
                found: format!("{other:?}"),
            }),
        }
    }
}

/// Spreadsheet cell name (`B12`) of a 0-based row and column.
fn cell_name(row: u32, col: u32) -> String {
    // In u64: a sheet's cell references are the file's, and `u32::MAX + 1` names a cell too.
    let mut letters = Vec::new();
    let mut c = u64::from(col) + 1;
    while c > 0 {
        let rem = ((c - 1) % 26) as u8;
        letters.push((b'A' + rem) as char);
        c = (c - 1) / 26;
    }
    letters.iter().rev().collect::<String>() + &(u64::from(row) + 1).to_string()
}

/// Reads the eight runs of `synonym.xlsx` (columns `word_runK`, `synonym_runK`).
pub fn read_synonym_xlsx(path: &Path) -> Result<Vec<Vec<SynonymRow>>> {
    let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
    parse_synonym_xlsx(&bytes, path)
}

/// Parses the bytes of a `synonym.xlsx`; `path` is what errors name.
pub fn parse_synonym_xlsx(bytes: &[u8], path: &Path) -> Result<Vec<Vec<SynonymRow>>> {
    let sheet = Sheet::parse(bytes, path)?;
    let mut runs = Vec::with_capacity(N_SYNONYM_RUNS);
    for k in 1..=N_SYNONYM_RUNS {
        let (word_name, synonym_name) = (format!("word_run{k}"), format!("synonym_run{k}"));
        let (word_col, synonym_col) = (sheet.column(&word_name)?, sheet.column(&synonym_name)?);
        let mut run = Vec::with_capacity(sheet.rows.len());
        for row in &sheet.rows {
            run.push((
                sheet.text(row, word_col, &word_name)?,
                sheet.text(row, synonym_col, &synonym_name)?,
            ));
        }
        runs.push(run);
    }
    Ok(runs)
}

/// Reads one `wheelN.xlsx` (columns `level1`, `level2`, `level3`).
pub fn read_wheel_xlsx(path: &Path) -> Result<WheelTree> {
    let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
    parse_wheel_xlsx(&bytes, path)
}

/// Parses the bytes of one `wheelN.xlsx`; `path` is what errors name.
pub fn parse_wheel_xlsx(bytes: &[u8], path: &Path) -> Result<WheelTree> {
    let sheet = Sheet::parse(bytes, path)?;
    let names = ["level1", "level2", "level3"];
    let cols = [
        sheet.column(names[0])?,
        sheet.column(names[1])?,
        sheet.column(names[2])?,
    ];
    let mut rows = Vec::with_capacity(sheet.rows.len());
    for row in &sheet.rows {
        rows.push([
            sheet.text(row, cols[0], names[0])?,
            sheet.text(row, cols[1], names[1])?,
            sheet.text(row, cols[2], names[2])?,
        ]);
    }
    Ok(WheelTree::from_rows(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn blank_cells_repeat_the_value_above_per_column() {
        let tree = WheelTree::from_rows([
            [s(" Mad "), s("Hurt"), s("Distant")],
            [None, None, s("Sarcastic")],
            [None, s("Angry"), None],
            [s("Scared"), None, s("Bewildered")],
        ]);
        let map = tree.level1_map();
        assert_eq!(map["distant"], "mad");
        assert_eq!(map["sarcastic"], "mad");
        assert_eq!(map["hurt"], "mad");
        assert_eq!(map["bewildered"], "scared");
        assert_eq!(map["scared"], "scared");
        // The blank level-3 cell of row 3 repeats `sarcastic` under the new level-2 `angry`.
        assert_eq!(
            tree.groups[0].1[1],
            ("angry".to_string(), vec!["sarcastic".to_string()])
        );
        // The blank level-2 cell of row 4 carries `angry` into the new level-1 group `scared`,
        // which, coming later, owns it.
        assert_eq!(
            tree.groups[1].1[0],
            ("angry".to_string(), vec!["bewildered".to_string()])
        );
        assert_eq!(map["angry"], "scared");
    }

    #[test]
    fn a_word_under_two_level1_groups_maps_to_the_later_group_in_first_appearance_order() {
        // Group order is by first appearance of the level-1 word: mad, then sad. `x` is seen
        // under sad first and under mad later, but the mad group is written first, so sad wins.
        let tree = WheelTree::from_rows([
            [s("Mad"), s("a"), s("y")],
            [s("Sad"), s("b"), s("x")],
            [s("Mad"), s("c"), s("x")],
        ]);
        assert_eq!(tree.level1_map()["x"], "sad");
    }

    #[test]
    fn shipped_files_are_the_wheel_files_in_order_and_parse() {
        let names: Vec<&str> = SHIPPED_FILES.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, WHEEL_FILES);
        let wheels = EmotionWheels::shipped().unwrap();
        assert_eq!(wheels.n_wheels(), N_WHEELS);
        assert_eq!(wheels.map_label("fear", 0), Some("scared"));
    }

    #[test]
    fn a_broken_spreadsheet_is_named_in_the_error() {
        let err = parse_wheel_xlsx(b"not a zip", Path::new("dir/wheel2.xlsx")).unwrap_err();
        assert!(matches!(&err, Error::Spreadsheet { path, .. } if path.ends_with("wheel2.xlsx")));
        assert!(err.to_string().contains("dir/wheel2.xlsx"), "{err}");
    }

    #[test]
    fn cell_names_follow_spreadsheet_notation() {
        assert_eq!(cell_name(0, 0), "A1");
        assert_eq!(cell_name(11, 1), "B12");
        assert_eq!(cell_name(0, 26), "AA1");
    }

    #[test]
    fn the_last_cell_a_sheet_can_reference_is_named_without_overflow() {
        // An error about a crafted workbook names its cell; the reference is the file's.
        assert_eq!(cell_name(u32::MAX, u32::MAX), "MWLQKWV4294967296");
    }

    #[test]
    fn pandas_missing_value_spellings_count_as_blank() {
        assert_eq!(pandas_cell("NA"), None);
        assert_eq!(pandas_cell("null"), None);
        assert_eq!(pandas_cell("none"), Some("none"));
    }
}

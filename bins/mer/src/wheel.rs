//! The emotion-wheel data and the label mapping of MER-UniBench (README steps 3 to 6).
//!
//! Reference: AffectGPT (Lian et al., ICML 2025), `my_affectgpt/evaluation/wheel.py`:
//! `read_format2raws`, `read_candidate_synonym_merge`, `func_get_wheel_cluster(level1)` and
//! `func_backward_case3`. The files are read as the authors publish them (`format.csv`,
//! `synonym.xlsx`, `wheel1.xlsx` .. `wheel5.xlsx`), with pandas' reading rules where they matter:
//! a cell spelled like a pandas missing value (`NA`, `null`, `nan`, ...) counts as blank.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use calamine::{open_workbook, Data, Reader, Xlsx};

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
        let format_rows = read_format_csv(&dir.join("format.csv"))?;
        let synonym_runs = read_synonym_xlsx(&dir.join("synonym.xlsx"))?;
        let mut wheels = Vec::with_capacity(N_WHEELS);
        for k in 1..=N_WHEELS {
            wheels.push(read_wheel_xlsx(&dir.join(format!("wheel{k}.xlsx")))?);
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
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let mut reader = csv::ReaderBuilder::new().from_reader(BufReader::new(file));
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
    fn open(path: &Path) -> Result<Sheet> {
        let spreadsheet_error = |message: String| Error::Spreadsheet {
            path: path.to_path_buf(),
            message,
        };
        let mut workbook: Xlsx<BufReader<File>> = open_workbook(path)
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
    let mut letters = Vec::new();
    let mut c = col + 1;
    while c > 0 {
        let rem = ((c - 1) % 26) as u8;
        letters.push((b'A' + rem) as char);
        c = (c - 1) / 26;
    }
    letters.iter().rev().collect::<String>() + &(row + 1).to_string()
}

/// Reads the eight runs of `synonym.xlsx` (columns `word_runK`, `synonym_runK`).
pub fn read_synonym_xlsx(path: &Path) -> Result<Vec<Vec<SynonymRow>>> {
    let sheet = Sheet::open(path)?;
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
    let sheet = Sheet::open(path)?;
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
    fn cell_names_follow_spreadsheet_notation() {
        assert_eq!(cell_name(0, 0), "A1");
        assert_eq!(cell_name(11, 1), "B12");
        assert_eq!(cell_name(0, 26), "AA1");
    }

    #[test]
    fn pandas_missing_value_spellings_count_as_blank() {
        assert_eq!(pandas_cell("NA"), None);
        assert_eq!(pandas_cell("null"), None);
        assert_eq!(pandas_cell("none"), Some("none"));
    }
}

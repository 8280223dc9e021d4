//! Plain-text tables and key–value blocks, aligned by display width (CJK characters count as 2).

use unicode_width::UnicodeWidthStr;

/// The display width of `s` in a terminal.
pub(crate) fn width(s: &str) -> usize {
    UnicodeWidthStr::width(s)
}

/// Replaces line breaks, tabs and other control characters, so that one cell stays on one line.
pub(crate) fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `s` padded with spaces to display width `w`.
fn pad(s: &str, w: usize) -> String {
    let mut out = String::with_capacity(s.len() + w);
    out.push_str(s);
    for _ in width(s)..w {
        out.push(' ');
    }
    out
}

/// A table with a header row; columns are separated by two spaces and the last is not padded.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub(crate) fn new<I, S>(headers: I) -> Table
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are kept.
    pub(crate) fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.rows
            .push(cells.into_iter().map(|c| one_line(c.as_ref())).collect());
    }

    /// Whether the table has no rows.
    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, each ending in a newline.
    pub(crate) fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; columns];
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(width(cell));
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut text = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = line.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    text.push_str("  ");
                }
                if i + 1 == columns {
                    text.push_str(cell);
                } else {
                    text.push_str(&pad(cell, *w));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `label: value` lines with the values aligned; empty values are left out.
pub(crate) fn key_values(pairs: &[(&str, String)]) -> String {
    let shown: Vec<_> = pairs.iter().filter(|(_, v)| !v.is_empty()).collect();
    let w = shown.iter().map(|(k, _)| width(k)).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in shown {
        out.push_str(&pad(&format!("{k}:"), w + 1));
        out.push_str("  ");
        out.push_str(&one_line(v));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chinese_text_counts_double_width() {
        assert_eq!(width("养老保险"), 8);
        assert_eq!(width("abc"), 3);
        let mut t = Table::new(["ID", "NAME", "SHARE"]);
        t.row([
            "330000/hrss/pension-status",
            "城乡居民养老保险待遇发放",
            "CONDITIONAL",
        ]);
        t.row(["330000/mca/death", "死亡登记", "UNCONDITIONAL"]);
        t.row(["x", "ascii name", "NOT_SHARED"]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        // The third column starts at the same display column on every line.
        let last = ["SHARE", "CONDITIONAL", "UNCONDITIONAL", "NOT_SHARED"];
        let starts: Vec<usize> = lines
            .iter()
            .zip(last)
            .map(|(l, cell)| width(&l[..l.rfind(cell).unwrap()]))
            .collect();
        assert!(starts.iter().all(|s| *s == starts[0]), "{text}\n{starts:?}");
        assert_eq!(
            starts[0],
            width("330000/hrss/pension-status  城乡居民养老保险待遇发放  ")
        );
        assert!(lines[1].ends_with("CONDITIONAL"));
        assert!(!text.lines().any(|l| l.ends_with(' ')));
    }

    #[test]
    fn cells_stay_on_one_line() {
        let mut t = Table::new(["A", "B"]);
        t.row(["line\nbreak", "tab\there"]);
        assert_eq!(t.render().lines().count(), 2);
    }

    #[test]
    fn key_values_align_and_skip_empty() {
        let text = key_values(&[
            ("id", "d1".to_string()),
            ("state", "PENDING".to_string()),
            ("grant", String::new()),
        ]);
        assert_eq!(text, "id:     d1\nstate:  PENDING\n");
    }
}

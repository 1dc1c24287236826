//! The admin CLI's tables: columns as wide as their widest cell, so a
//! long name (an IAM ARN, an OIDC subject) widens its column instead of
//! pushing the rest of its row out of line.
//!
//! Width is what a terminal shows, not bytes: one column per character,
//! two for the East Asian wide and fullwidth characters (CJK, Hangul,
//! fullwidth forms, most emoji), none for combining marks. That is an
//! approximation of Unicode's East Asian Width (UAX #11) by its main
//! ranges, small enough to keep here rather than add a dependency for
//! the CLI.
//!
//! Not here: fetching or formatting the values, colour, wrapping.

/// How a column's cells line up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Columns a terminal gives `c`.
fn char_width(c: char) -> usize {
    let u = u32::from(c);
    let combining = matches!(u, 0x0300..=0x036F | 0x1AB0..=0x1AFF | 0x1DC0..=0x1DFF | 0x20D0..=0x20FF | 0xFE20..=0xFE2F)
        || u == 0x200B
        || u == 0x200D;
    let wide = matches!(
        u,
        0x1100..=0x115F
            | 0x2E80..=0x303E
            | 0x3041..=0x33FF
            | 0x3400..=0x4DBF
            | 0x4E00..=0x9FFF
            | 0xA000..=0xA4CF
            | 0xAC00..=0xD7A3
            | 0xF900..=0xFAFF
            | 0xFE30..=0xFE4F
            | 0xFF00..=0xFF60
            | 0xFFE0..=0xFFE6
            | 0x1F300..=0x1F64F
            | 0x1F900..=0x1F9FF
            | 0x20000..=0x3FFFD
    );
    if combining {
        0
    } else if wide {
        2
    } else {
        1
    }
}

/// Columns a terminal gives `s`.
pub fn width(s: &str) -> usize {
    s.chars().map(char_width).sum()
}

/// Renders `header` and `rows` with two spaces between columns; the last
/// column is not padded (no trailing blanks). `align` gives each
/// column's alignment; missing entries are left-aligned.
pub fn render(header: &[&str], rows: &[Vec<String>], align: &[Align]) -> String {
    let cols = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| width(h)).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(cell));
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate().take(cols) {
            let pad = widths[i].saturating_sub(width(cell));
            let last = i + 1 == cols;
            if i > 0 {
                line.push_str("  ");
            }
            match align.get(i).copied().unwrap_or(Align::Left) {
                Align::Right => {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                }
                Align::Left => {
                    line.push_str(cell);
                    if !last {
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_count_what_a_terminal_shows() {
        assert_eq!(width("alice"), 5);
        assert_eq!(width("Zoë Ångström"), 12);
        assert_eq!(width("山田"), 4);
        assert_eq!(width("e\u{301}"), 1);
        assert_eq!(width("🦀"), 2);
    }

    /// Where each cell of a row starts on its line, in display columns.
    fn starts(line: &str, cells: &[&str]) -> Vec<usize> {
        let mut from = 0;
        let mut out = Vec::new();
        for c in cells {
            let i = from + line[from..].find(c).unwrap_or_else(|| panic!("{c:?} not in {line:?}"));
            out.push(width(&line[..i]));
            from = i + c.len();
        }
        out
    }

    /// Every left-aligned column starts, and every right-aligned one
    /// ends, at the same display column on every line, whatever the names.
    #[test]
    fn long_and_wide_names_keep_columns_aligned() {
        let cells: [[&str; 4]; 4] = [
            ["NAME", "ADMIN", "N", "GROUPS"],
            ["arn:aws:iam::1234567890:user/Alice", "no", "1", "ops"],
            ["山田", "yes", "12345", "-"],
            ["Zoë Ångström", "no", "7", "system:masters"],
        ];
        let rows: Vec<Vec<String>> = cells[1..].iter().map(|r| r.iter().map(|c| c.to_string()).collect()).collect();
        let text = render(&cells[0], &rows, &[Align::Left, Align::Left, Align::Right]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        let at: Vec<Vec<usize>> = lines.iter().zip(&cells).map(|(l, c)| starts(l, c)).collect();
        for row in &at {
            assert_eq!((row[0], row[1], row[3]), (at[0][0], at[0][1], at[0][3]), "{text}");
        }
        let ends: Vec<usize> = at.iter().zip(&cells).map(|(a, c)| a[2] + width(c[2])).collect();
        assert!(ends.iter().all(|&e| e == ends[0]), "{ends:?}\n{text}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')));
    }
}

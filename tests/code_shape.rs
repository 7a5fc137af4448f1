//! The shape of the code: no function in src/ is longer than
//! [`MAX_FN_LINES`] lines, so each one can be read at once. A scanner, not
//! a parser: it skips comments, strings and char literals, finds each `fn
//! name` with a body and matches its braces.

use std::path::{Path, PathBuf};

/// The longest a function may be, from its `fn` line to its closing brace.
const MAX_FN_LINES: usize = 80;

/// Functions that may be longer because they are declarative tables (one
/// entry per item, no logic), as `path:name`.
const TABLES: &[&str] = &[
    // Every metric's name, help text and labels, one field each.
    "src/metrics.rs:table",
];

/// One function found: where, its name, how many lines.
#[derive(Debug, PartialEq)]
struct Function {
    /// 1-based line of its `fn`.
    line: usize,
    /// Its name.
    name: String,
    /// Lines from `fn` to the closing brace, both included.
    lines: usize,
}

/// The source with comments, strings and char literals blanked out (kept as
/// spaces, newlines kept), so braces and `fn` can be found by scanning.
fn code_only(src: &str) -> Vec<char> {
    let s: Vec<char> = src.chars().collect();
    let mut out = s.clone();
    let mut i = 0;
    let blank = |out: &mut Vec<char>, from: usize, to: usize| {
        for c in &mut out[from..to.min(s.len())] {
            if *c != '\n' {
                *c = ' ';
            }
        }
    };
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    while i < s.len() {
        let next = s.get(i + 1).copied();
        if s[i] == '/' && next == Some('/') {
            let end = s[i..].iter().position(|&c| c == '\n').map_or(s.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if s[i] == '/' && next == Some('*') {
            let (mut depth, mut j) = (1, i + 2);
            while j < s.len() && depth > 0 {
                if s[j] == '/' && s.get(j + 1) == Some(&'*') {
                    depth += 1;
                    j += 1;
                } else if s[j] == '*' && s.get(j + 1) == Some(&'/') {
                    depth -= 1;
                    j += 1;
                }
                j += 1;
            }
            blank(&mut out, i, j);
            i = j;
        } else if s[i] == 'r'
            && (i == 0 || !ident(s[i - 1]) || (s[i - 1] == 'b' && (i < 2 || !ident(s[i - 2]))))
            && matches!(next, Some('#') | Some('"'))
        {
            let hashes = s[i + 1..].iter().take_while(|&&c| c == '#').count();
            if s.get(i + 1 + hashes) != Some(&'"') {
                i += 1;
                continue;
            }
            let close: Vec<char> = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
            let mut j = i + 2 + hashes;
            while j < s.len() && !s[j..].starts_with(&close) {
                j += 1;
            }
            blank(&mut out, i, j + close.len());
            i = j + close.len();
        } else if s[i] == '"' {
            let mut j = i + 1;
            while j < s.len() && s[j] != '"' {
                j += if s[j] == '\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if s[i] == '\'' {
            // A char literal ('x', '\n', '\u{1F600}'), or a lifetime ('a).
            let end = if next == Some('\\') {
                s[i + 2..].iter().position(|&c| c == '\'').map(|p| i + 2 + p)
            } else if s.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    blank(&mut out, i, e + 1);
                    i = e + 1;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Every `fn name … { … }` in `src` (declarations without a body skipped).
fn functions(src: &str) -> Vec<Function> {
    let code = code_only(src);
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let line_of = |at: usize| code[..at].iter().filter(|&&c| c == '\n').count() + 1;
    let mut found = Vec::new();
    for i in 0..code.len().saturating_sub(3) {
        let is_fn = code[i] == 'f'
            && code[i + 1] == 'n'
            && code[i + 2].is_whitespace()
            && (i == 0 || !ident(code[i - 1]));
        if !is_fn {
            continue;
        }
        let name_start = i + 2 + code[i + 2..].iter().take_while(|c| c.is_whitespace()).count();
        let name: String = code[name_start..].iter().take_while(|&&c| ident(c)).collect();
        if name.is_empty() {
            continue; // `fn(…)`, a pointer type
        }
        // The body starts at the first `{` outside parentheses and brackets;
        // a `;` first means there is none.
        let (mut depth, mut j) = (0i32, name_start);
        let open = loop {
            match code.get(j) {
                None => break None,
                Some('(' | '[') => depth += 1,
                Some(')' | ']') => depth -= 1,
                Some('{') if depth == 0 => break Some(j),
                Some(';') if depth == 0 => break None,
                _ => {}
            }
            j += 1;
        };
        let Some(open) = open else { continue };
        let (mut braces, mut k) = (0i32, open);
        while k < code.len() {
            match code[k] {
                '{' => braces += 1,
                '}' => {
                    braces -= 1;
                    if braces == 0 {
                        break;
                    }
                }
                _ => {}
            }
            k += 1;
        }
        let line = line_of(i);
        found.push(Function { line, name, lines: line_of(k.min(code.len() - 1)) - line + 1 });
    }
    found
}

/// The `.rs` files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_function_in_src_is_longer_than_80_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut long = Vec::new();
    for file in files {
        let rel = file.strip_prefix(root).unwrap().display().to_string();
        for f in functions(&std::fs::read_to_string(&file).unwrap()) {
            let entry = format!("{rel}:{}", f.name);
            if f.lines > MAX_FN_LINES && !TABLES.contains(&entry.as_str()) {
                long.push(format!("{rel}:{}: fn {} is {} lines", f.line, f.name, f.lines));
            }
        }
    }
    assert!(long.is_empty(), "functions over {MAX_FN_LINES} lines (split them):\n{}", long.join("\n"));
}

#[test]
fn the_scanner_sees_through_strings_comments_and_lifetimes() {
    let src = r####"
// fn commented() {
fn a<'x>(s: &'x str) -> char {
    let _ = "} fn fake() {";
    let _ = r#"}"#;
    let _ = '}';
    let _ = '\'';
    /* } /* nested } */ */
    'q'
}
trait T { fn declared(&self); }
fn b(f: fn(u8) -> u8) {
}
"####;
    let got: Vec<(String, usize, usize)> =
        functions(src).into_iter().map(|f| (f.name, f.line, f.lines)).collect();
    assert_eq!(got, [("a".to_owned(), 3, 8), ("b".to_owned(), 12, 2)]);
}

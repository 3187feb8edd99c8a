//! The README's error table and the codes pinproxy answers with agree: every
//! code `ProxyError::code` and `Throttle::code` can return has a row, and
//! every row's code is one of them (a renamed or removed code leaves no
//! stale row behind).
//!
//! Reads the two functions' source rather than listing the variants here:
//! a list kept beside the enum would drift the way the table did.

use std::collections::BTreeSet;
use std::path::Path;

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether `text` is shaped like an error code: lower-case words joined by
/// single hyphens.
fn is_code(text: &str) -> bool {
    !text.is_empty()
        && text.split('-').all(|word| {
            !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// The string literals returned by the `pub fn code(&self)` of `file`: the
/// function's body runs from its signature to the first line that closes it
/// at the signature's indentation.
fn codes_in(file: &str) -> BTreeSet<String> {
    let text = read(file);
    let signature = "pub fn code(&self) -> &'static str {";
    let start = text
        .find(signature)
        .unwrap_or_else(|| panic!("{file}: no `{signature}`"));
    let line_start = text[..start].rfind('\n').map_or(0, |at| at + 1);
    let indent = &text[line_start..start];
    let closing = format!("\n{indent}}}\n");
    let body_len = text[start..]
        .find(&closing)
        .unwrap_or_else(|| panic!("{file}: `code` never closes"));
    let body = &text[start + signature.len()..start + body_len];
    let codes: BTreeSet<String> = body
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|literal| is_code(literal))
        .map(str::to_owned)
        .collect();
    assert!(!codes.is_empty(), "{file}: no code literal found in `code`");
    codes
}

/// The codes of the README's `## Errors` table: the backticked words of its
/// second column.
fn documented_codes() -> BTreeSet<String> {
    let readme = read("README.md");
    let section = readme
        .split("\n## Errors\n")
        .nth(1)
        .expect("README has an `## Errors` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut codes = BTreeSet::new();
    for row in section.lines().filter(|line| line.starts_with("| ")) {
        let Some(column) = row.split('|').nth(2) else {
            continue;
        };
        for code in column.split('`').skip(1).step_by(2) {
            if is_code(code) {
                codes.insert(code.to_owned());
            }
        }
    }
    assert!(!codes.is_empty(), "README's error table lists no code");
    codes
}

#[test]
fn the_readme_error_table_lists_every_code_and_no_other() {
    let mut answered = codes_in("src/proxy/error.rs");
    answered.extend(codes_in("src/proxy/pacing.rs"));
    let documented = documented_codes();
    let missing: Vec<_> = answered.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&answered).collect();
    assert!(
        missing.is_empty(),
        "codes pinproxy answers with that README's error table does not list: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "codes README's error table lists that pinproxy never answers with: {stale:?}"
    );
}

//! What `check` finds beyond loading the script: calls to functions the Lua API
//! does not have (errors: they would fail only when the handler runs), handler
//! kinds no source can produce and sources whose kind has no handler (warnings).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use mlua::{Lua, Table, Value};

use crate::source::SourceSpec;
use crate::worker::InitReport;

/// The Lua API's global tables and their fields, read from a VM with the API installed.
pub fn api_names() -> HashMap<String, BTreeSet<String>> {
    let lua = Lua::new();
    let mut names = HashMap::new();
    if crate::lua_api::install(&lua).is_err() {
        return names;
    }
    for library in ["bus", "nats", "kv", "http", "sql", "sh", "log", "json", "time", "env"] {
        if let Ok(table) = lua.globals().get::<Table>(library) {
            let fields = table.pairs::<String, Value>().filter_map(|pair| pair.ok().map(|(name, _)| name)).collect();
            names.insert(library.to_string(), fields);
        }
    }
    names
}

/// `file:line: unknown function lib.name` for every `lib.name` in `script` and the
/// modules it requires by a literal name next to it.
pub fn unknown_calls(script: &Path, api: &HashMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut errors = Vec::new();
    let mut pending = vec![script.to_path_buf()];
    let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
    let dir = script.parent().map(Path::to_path_buf).unwrap_or_default();
    while let Some(path) = pending.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        let Ok(source) = std::fs::read_to_string(&path) else { continue };
        let code = strip_comments_and_strings(&source);
        for (line, library, name) in field_uses(&code) {
            let Some(known) = api.get(library) else { continue };
            if !known.contains(name) {
                let list: Vec<&str> = known.iter().map(String::as_str).collect();
                errors.push(format!(
                    "{}:{line}: unknown function {library}.{name} ({library} has: {})",
                    path.display(),
                    list.join(", ")
                ));
            }
        }
        for module in required_modules(&source) {
            let candidate = dir.join(format!("{}.lua", module.replace('.', "/")));
            if candidate.is_file() {
                pending.push(candidate);
            }
        }
    }
    errors
}

/// Handler kinds no source can produce, and sources none of whose kinds has a
/// handler (when there is no `bus.on_any`).
pub fn kind_warnings(report: &InitReport, worker_name: &str) -> Vec<String> {
    let mut warnings = Vec::new();
    let produces = |source: &SourceSpec, kind: &str| {
        let (pattern, template) = source.subject_and_kind();
        template.can_produce(pattern, kind)
    };
    for kind in &report.kinds {
        if !report.sources.iter().any(|source| produces(source, kind)) {
            warnings.push(format!(
                "handler for kind {kind:?}: no subscription or consumer produces this kind; it never runs"
            ));
        }
    }
    if report.has_on_any {
        return warnings;
    }
    for source in &report.sources {
        let (pattern, template) = source.subject_and_kind();
        let handled = report.kinds.iter().any(|kind| produces(source, kind));
        if handled {
            continue;
        }
        let what = source.describe(worker_name);
        match template.fixed_kind(pattern) {
            Some(kind) => warnings.push(format!(
                "{what}: its kind {kind:?} has no handler and there is no bus.on_any; its events fail with 404"
            )),
            None => warnings.push(format!(
                "{what}: no handler takes any kind it produces and there is no bus.on_any; its events fail with 404"
            )),
        }
    }
    warnings
}

/// `require("name")` / `require 'name'` with a literal name.
fn required_modules(source: &str) -> Vec<String> {
    let mut modules = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("require") {
        rest = &rest[at + "require".len()..];
        let trimmed = rest.trim_start().trim_start_matches('(').trim_start();
        let Some(quote) = trimmed.chars().next().filter(|c| *c == '"' || *c == '\'') else { continue };
        if let Some(end) = trimmed[1..].find(quote) {
            modules.push(trimmed[1..1 + end].to_string());
        }
    }
    modules
}

/// Replaces comments and string literals by spaces, keeping line breaks, so
/// what remains is code at the same lines.
fn strip_comments_and_strings(source: &str) -> String {
    let bytes = source.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let blank =
        |out: &mut Vec<u8>, text: &[u8]| out.extend(text.iter().map(|&b| if b == b'\n' { b'\n' } else { b' ' }));
    while i < bytes.len() {
        let rest = &bytes[i..];
        if rest.starts_with(b"--") {
            let end = match long_bracket(&rest[2..]) {
                Some(level) => find_close(rest, 2, level),
                None => rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len()),
            };
            blank(&mut out, &rest[..end]);
            i += end;
        } else if let Some(level) = (rest[0] == b'[').then(|| long_bracket(rest)).flatten() {
            let end = find_close(rest, 0, level);
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'"' || rest[0] == b'\'' {
            let quote = rest[0];
            let mut end = 1;
            while end < rest.len() && rest[end] != quote && rest[end] != b'\n' {
                end += if rest[end] == b'\\' { 2 } else { 1 };
            }
            let end = (end + 1).min(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else {
            out.push(rest[0]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The level of a long bracket `[==[` at the start of `text`.
fn long_bracket(text: &[u8]) -> Option<usize> {
    if text.first() != Some(&b'[') {
        return None;
    }
    let level = text[1..].iter().take_while(|&&b| b == b'=').count();
    (text.get(1 + level) == Some(&b'[')).then_some(level)
}

/// The end (exclusive) of the long bracket opened at `start` in `text`.
fn find_close(text: &[u8], start: usize, level: usize) -> usize {
    let close: Vec<u8> = std::iter::once(b']').chain(std::iter::repeat_n(b'=', level)).chain([b']']).collect();
    text[start..]
        .windows(close.len())
        .position(|w| w == close.as_slice())
        .map_or(text.len(), |p| start + p + close.len())
}

/// `(line, library, field)` for each `library.field` or `library:field` whose
/// `library` is a free name (not itself a field).
fn field_uses(code: &str) -> Vec<(usize, &str, &str)> {
    let mut uses = Vec::new();
    for (number, line) in code.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if !is_name_start(bytes[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && is_name_char(bytes[i]) {
                i += 1;
            }
            let free = start == 0 || !matches!(bytes[start - 1], b'.' | b':');
            if free && i + 1 < bytes.len() && matches!(bytes[i], b'.' | b':') && is_name_start(bytes[i + 1]) {
                let field_start = i + 1;
                let mut end = field_start;
                while end < bytes.len() && is_name_char(bytes[end]) {
                    end += 1;
                }
                uses.push((number + 1, &line[start..i], &line[field_start..end]));
            }
        }
    }
    uses
}

fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_outside_comments_and_strings_are_found() {
        let code = strip_comments_and_strings(
            "bus.on('a.b', f) -- bus.nope\nlocal s = \"nats.publsh\"\n--[[ bus.gone\n]] nats.publsh(x)\nx.bus.y()\n",
        );
        let uses = field_uses(&code);
        assert_eq!(uses, vec![(1, "bus", "on"), (4, "nats", "publsh"), (5, "x", "bus")]);
    }

    #[test]
    fn literal_requires_are_found() {
        assert_eq!(required_modules("local v = require(\"validate\")\nrequire 'lib.util'"), ["validate", "lib.util"]);
    }
}

//! The layout keeps its layers: every `crate::`/`super::` import in `src/` points
//! down the list of layers below (or stays in its layer), and no file imports one
//! that imports it back, directly or around a longer circle. The README's
//! "Layout" section shows the same list. A failure names the file and line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, top first, in the order data flows. A file belongs to the first
/// entry that is its module path or a folder above it.
const LAYERS: &[(&str, &[&str])] = &[
    ("command line", &["main", "cli", "command", "config"]),
    ("settings", &["preflight", "logging"]),
    ("runtime", &["runtime", "testkit", "probes", "health"]),
    ("sources", &["source/core", "source/replay", "source/jetstream", "source/declared"]),
    ("worker", &["worker"]),
    ("intake", &["intake", "source/mod"]),
    ("Lua API", &["lua_api"]),
    ("Lua core", &["lua", "bridge", "connect", "transport", "source_spec", "settings"]),
    ("settle and telemetry", &["settle", "telemetry"]),
    (
        "leaf types",
        &[
            "event",
            "allocator",
            "ack_subject",
            "partitioning",
            "outcome",
            "kind",
            "duration",
            "headers",
            "panics",
            "memory",
            "log_limit",
            "nats_url",
            "nats_server",
            "report",
            "secrets",
            "lib",
        ],
    ),
];

/// One source file: its module path (`source/jetstream/pull`, `vm/mod`) and text.
struct File {
    module: String,
    text: String,
}

fn files(dir: &Path, out: &mut Vec<File>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("read src entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative: PathBuf = path.strip_prefix("src").unwrap().with_extension("");
            let module = relative.to_string_lossy().replace('\\', "/");
            out.push(File { module, text: std::fs::read_to_string(&path).expect("read source") });
        }
    }
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, prefixes)| {
        prefixes.iter().any(|prefix| module == *prefix || module.starts_with(&format!("{prefix}/")))
    })
}

/// The code of a line, without a `//` comment.
fn code(line: &str) -> &str {
    match line.find("//") {
        Some(at) => &line[..at],
        None => line,
    }
}

/// Module paths named by `crate::a::b`, `super::c` and `crate::{a, b::c}` on a
/// line, as written (absolute, `super` resolved against `module`).
fn named_paths(line: &str, module: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let bytes = line.as_bytes();
    for (root, start) in [("crate::", 0usize), ("super::", 1)] {
        let mut from = 0;
        while let Some(at) = line[from..].find(root) {
            let at = from + at;
            from = at + root.len();
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            let base: Vec<String> = if start == 0 {
                Vec::new()
            } else {
                let mut parts: Vec<String> = module.split('/').map(str::to_string).collect();
                parts.pop();
                if module.ends_with("/mod") {
                    parts.pop();
                }
                parts
            };
            let rest = &line[from..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                for item in group.split(',') {
                    let mut path = base.clone();
                    path.extend(item.trim().split("::").map(|p| p.trim().to_string()).filter(|p| !p.is_empty()));
                    paths.push(path);
                }
            } else {
                let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
                let mut path = base;
                path.extend(rest[..end].split("::").filter(|p| !p.is_empty()).map(str::to_string));
                paths.push(path);
            }
        }
    }
    paths
}

/// The file a path points into: the longest prefix that is a module.
fn target(path: &[String], modules: &BTreeSet<String>) -> Option<String> {
    (1..=path.len()).rev().find_map(|n| {
        let joined = path[..n].join("/");
        if modules.contains(&joined) {
            Some(joined)
        } else if modules.contains(&format!("{joined}/mod")) {
            Some(format!("{joined}/mod"))
        } else {
            None
        }
    })
}

#[test]
fn imports_point_down_the_layers_and_never_circle() {
    let mut all = Vec::new();
    files(Path::new("src"), &mut all);
    let modules: BTreeSet<String> = all.iter().map(|f| f.module.clone()).collect();
    let mut problems = Vec::new();
    let mut edges: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for file in &all {
        let Some(own) = layer_of(&file.module) else {
            problems.push(format!("src/{}.rs: in no layer; add it to LAYERS and the README's Layout", file.module));
            continue;
        };
        // Test modules sit at the end of a file and may reach anywhere.
        let lines = file.text.lines().take_while(|line| line.trim() != "#[cfg(test)]");
        for (number, line) in lines.enumerate() {
            for path in named_paths(code(line), &file.module) {
                let Some(to) = target(&path, &modules) else { continue };
                if to == file.module {
                    continue;
                }
                edges.entry(file.module.clone()).or_default().entry(to.clone()).or_insert(number + 1);
                if let Some(theirs) = layer_of(&to)
                    && theirs < own
                {
                    problems.push(format!(
                        "src/{}.rs:{}: imports src/{to}.rs of layer \"{}\" from below it (\"{}\")",
                        file.module,
                        number + 1,
                        LAYERS[theirs].0,
                        LAYERS[own].0
                    ));
                }
            }
        }
    }
    for circle in circles(&edges) {
        let steps: Vec<String> = circle
            .windows(2)
            .map(|pair| format!("src/{}.rs:{} -> src/{}.rs", pair[0], edges[&pair[0]][&pair[1]], pair[1]))
            .collect();
        problems.push(format!("a circle of imports: {}", steps.join(", ")));
    }
    assert!(problems.is_empty(), "{} layout problems:\n{}", problems.len(), problems.join("\n"));
}

/// Each circle of the import graph once, as a path that ends where it starts.
fn circles(edges: &BTreeMap<String, BTreeMap<String, usize>>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut reported: BTreeSet<BTreeSet<String>> = BTreeSet::new();
    for start in edges.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        while let Some((at, path)) = stack.pop() {
            for next in edges.get(&at).into_iter().flat_map(|e| e.keys()) {
                if next == start {
                    let members: BTreeSet<String> = path.iter().cloned().collect();
                    if reported.insert(members) {
                        let mut circle = path.clone();
                        circle.push(start.clone());
                        found.push(circle);
                    }
                } else if !path.contains(next) && next > start && path.len() < 8 {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    found
}

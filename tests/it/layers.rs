//! The library's layer rule, read from the source: every `crate::` path in a module of one layer
//! names a module of the same layer or of a layer below it, and the generated protocol code is
//! included in one place. `cargo test --test it layers -- --nocapture` prints the module graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers from the bottom up, as `src/lib.rs` lists them; a module may import its own layer
/// and those before it.
const LAYERS: &[&str] =
    &["types", "protocol", "client", "error", "config", "store", "broker", "relay", "server"];

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The layer a library file belongs to (its top module), or `None` for the crate root and the
/// binary, which are not layers.
fn layer_of(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?;
    let top = first.strip_suffix(".rs").unwrap_or(first);
    match top {
        "lib" | "main" | "cli" => None,
        top => Some(top.to_string()),
    }
}

/// The top modules a file's text names as `crate::name`, outside comments.
fn imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            // `crate::{a, b}` lists several.
            if name.is_empty() && after.starts_with('{') {
                let list = after[1..].split('}').next().unwrap_or("");
                for item in list.split(',') {
                    let item = item.trim().split("::").next().unwrap_or("").trim();
                    if !item.is_empty() {
                        found.insert(item.to_string());
                    }
                }
            } else if !name.is_empty() {
                found.insert(name);
            }
            rest = after;
        }
    }
    found
}

#[test]
fn no_module_imports_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let rank = |layer: &str| LAYERS.iter().position(|l| *l == layer);

    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    let mut generated = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let text = std::fs::read_to_string(file).unwrap();
        if text.contains("include_proto!") || text.contains("env!(\"OUT_DIR\")") {
            generated.push(relative.display().to_string());
        }
        let Some(layer) = layer_of(relative) else { continue };
        let Some(own) = rank(&layer) else {
            wrong.push(format!(
                "{}: module {layer:?} is in no layer (add it to LAYERS and lib.rs)",
                relative.display()
            ));
            continue;
        };
        for target in imports(&text) {
            if target == layer {
                continue;
            }
            graph.entry(layer.clone()).or_default().insert(target.clone());
            match rank(&target) {
                Some(r) if r <= own => {}
                Some(_) => wrong.push(format!(
                    "{}: layer {layer} imports {target}, a layer above it",
                    relative.display()
                )),
                None => wrong
                    .push(format!("{}: imports crate::{target}, which is in no layer", relative.display())),
            }
        }
    }
    for layer in LAYERS {
        let below: Vec<&str> =
            graph.get(*layer).map(|t| t.iter().map(String::as_str).collect()).unwrap_or_default();
        println!("{layer:>8} -> {}", below.join(", "));
    }
    assert!(wrong.is_empty(), "the layer rule is broken:\n{}", wrong.join("\n"));
    assert_eq!(
        generated,
        ["protocol/mod.rs"],
        "the generated code must be included only in the protocol layer"
    );
}

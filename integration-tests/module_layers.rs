//! The import layers of `src/`: no module imports a module that imports it back, and the codec
//! is a leaf. Needs no etcd: it reads the source text.
//!
//! Every `.rs` file of `src/` (but `main.rs`, the binary) is read; comments, string literals
//! and `#[cfg(test)]` items are dropped (tests may reach across layers: they are not part of
//! the shipped graph). What is left is scanned for paths that start with `crate::`, `super::`,
//! `self::` or the name of a child module the file declares (`mod kv;` then `kv::KvService`),
//! in `use` items (grouped ones like `use crate::{a, b::{c, d}}` are expanded) and inline
//! (`crate::metrics::get()`). Each path is resolved to the file that defines its longest module
//! prefix; the rest of the path is the name that ties the two files.
//!
//! Two graphs are checked: files, and top-level modules (`codec`, `config`, `server`, …; a
//! directory is one module). A cycle in either fails the test, and so does any arrow from
//! `src/codec/` to a file outside it. `mod` declarations are not arrows: declaring a child is
//! not using it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Directories whose file-level cycle between `mod.rs` and its children would be tolerated
/// (printed, not failed). None: `src/server/mod.rs` only starts the services; `Shared`, the
/// statuses, the metadata helpers and the method table live in files of their own.
const PENDING_FILE_CYCLES_IN: &[&str] = &[];

/// One arrow: `from` uses `names` of `to` (file paths relative to the crate, or module names).
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

/// A source file of the library: its module path (`["codec", "delta"]`; `[]` for `lib.rs`).
struct SourceFile {
    path: String,
    module: Vec<String>,
    text: String,
}

/// Drops comments, the contents of string and char literals, and `#[cfg(test)]` items, keeping
/// everything else (line structure is not kept).
fn strip(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !chars.get(i.wrapping_sub(1)).is_some_and(|p| p.is_alphanumeric() || *p == '_') {
            // A raw string r"..." or r#"..."#: skip to the matching close.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (0..hashes).all(|h| chars.get(j + 1 + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' && (next == Some('\\') || chars.get(i + 2) == Some(&'\'')) {
            // A char literal ('x', '\n', '\u{1F600}'); a lifetime ('a) has no closing quote.
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    drop_cfg_test(&out)
}

/// Removes each `#[cfg(test)]` item: up to its `;` or through its braced block.
fn drop_cfg_test(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let mut depth = 0usize;
        let mut end = item.len();
        for (k, ch) in item.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = k + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = k + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths a `use` tree names, expanded: `crate::{a, b::{c, d}}` → `crate::a`, `crate::b::c`,
/// `crate::b::d`. `self` inside a group names the group's prefix; `as` renames are dropped.
fn expand_use(tree: &str) -> Vec<String> {
    fn go(prefix: &str, tree: &str, out: &mut Vec<String>) {
        let tree = tree.trim();
        if tree.is_empty() {
            return;
        }
        let join = |p: &str, s: &str| if p.is_empty() { s.to_string() } else { format!("{p}::{s}") };
        if let Some(open) = tree.find('{') {
            let head = tree[..open].trim().trim_end_matches("::").trim();
            let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            let prefix = if head.is_empty() { prefix.to_string() } else { join(prefix, head) };
            let mut depth = 0;
            let mut start = 0;
            for (k, ch) in inner.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        go(&prefix, &inner[start..k], out);
                        start = k + 1;
                    }
                    _ => {}
                }
            }
            go(&prefix, &inner[start..], out);
        } else {
            let path = tree.split(" as ").next().unwrap_or(tree).trim();
            out.push(if path == "self" { prefix.to_string() } else { join(prefix, path) });
        }
    }
    let mut out = Vec::new();
    go("", tree, &mut out);
    out.retain(|p| !p.is_empty());
    out
}

/// Every path of `text` (already [`strip`]ped) that may name a module of the crate: the paths of
/// `use` items, and inline paths of two segments or more starting with `crate`, `super`, `self`
/// or one of `children` (the modules the file declares).
fn paths(text: &str, children: &BTreeSet<String>) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = String::with_capacity(text.len());
    // `use` items first (they may be grouped), then cut out of the text.
    let mut t = text;
    loop {
        let Some(at) = find_word(t, "use") else {
            rest.push_str(t);
            break;
        };
        rest.push_str(&t[..at]);
        let end = t[at..].find(';').map_or(t.len(), |e| at + e);
        found.extend(expand_use(&t[at + 3..end]).into_iter().map(|p| p.trim_start_matches("::").to_string()));
        t = &t[(end + 1).min(t.len())..];
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if !is_ident_char(chars[i]) || (i > 0 && (is_ident_char(chars[i - 1]) || chars[i - 1] == ':')) {
            i += 1;
            continue;
        }
        let mut segments = Vec::new();
        let mut j = i;
        loop {
            let start = j;
            while j < chars.len() && is_ident_char(chars[j]) {
                j += 1;
            }
            if j == start {
                break;
            }
            segments.push(chars[start..j].iter().collect::<String>());
            let mut k = j;
            while k < chars.len() && chars[k].is_whitespace() {
                k += 1;
            }
            if chars.get(k) == Some(&':') && chars.get(k + 1) == Some(&':') {
                j = k + 2;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
            } else {
                break;
            }
        }
        let first = segments[0].as_str();
        if segments.len() >= 2 && (matches!(first, "crate" | "super" | "self") || children.contains(first)) {
            found.push(segments.join("::"));
        }
        i = j.max(i + 1);
    }
    found
}

/// The byte offset of the next `word` standing alone (not part of a longer identifier).
fn find_word(text: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(k) = text[from..].find(word) {
        let at = from + k;
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        if !before.is_some_and(is_ident_char) && !after.is_some_and(is_ident_char) {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

/// The child modules a file declares with `mod name;` (inline `mod name { … }` are part of the file).
fn declared_children(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = find_word(&text[from..], "mod").map(|k| from + k) {
        let after = text[at + 3..].trim_start();
        let name: String = after.chars().take_while(|c| is_ident_char(*c)).collect();
        if after[name.len()..].trim_start().starts_with(';') && !name.is_empty() {
            out.insert(name);
        }
        from = at + 3;
    }
    out
}

/// Resolves `path` used in the file of `module` to (the module it names, the name it uses),
/// `None` when it does not start inside the crate. `modules` are the modules that have a file.
fn resolve(module: &[String], children: &BTreeSet<String>, path: &str, modules: &BTreeSet<Vec<String>>) -> Option<(Vec<String>, String)> {
    let segments: Vec<&str> = path.split("::").map(str::trim).collect();
    let mut at: Vec<String>;
    let mut k = 0;
    match segments[0] {
        "crate" => {
            at = Vec::new();
            k = 1;
        }
        "self" => {
            at = module.to_vec();
            k = 1;
        }
        "super" => {
            at = module.to_vec();
            while segments.get(k) == Some(&"super") {
                at.pop()?;
                k += 1;
            }
        }
        first if children.contains(first) => at = module.to_vec(),
        _ => return None,
    }
    while let Some(seg) = segments.get(k) {
        let mut deeper = at.clone();
        deeper.push(seg.to_string());
        if !modules.contains(&deeper) {
            break;
        }
        at = deeper;
        k += 1;
    }
    let name = segments.get(k).map_or("self", |s| s).to_string();
    Some((at, name))
}

/// Reads the library's files under `src`.
fn read_sources(src: &Path) -> Vec<SourceFile> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    files.sort();
    files
        .into_iter()
        .filter(|p| p != &src.join("main.rs"))
        .map(|p| {
            let rel = p.strip_prefix(src).expect("under src");
            let mut module: Vec<String> = rel.with_extension("").iter().map(|s| s.to_string_lossy().into_owned()).collect();
            if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                module.pop();
            }
            let text = std::fs::read_to_string(&p).expect("read source file");
            SourceFile { path: format!("src/{}", rel.display()), module, text }
        })
        .collect()
}

/// The file graph and the top-level module graph of `files`.
fn graphs(files: &[SourceFile]) -> (Graph, Graph) {
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    let file_of: BTreeMap<&Vec<String>, &str> = files.iter().map(|f| (&f.module, f.path.as_str())).collect();
    let mut by_file = Graph::new();
    let mut by_module = Graph::new();
    for f in files {
        let text = strip(&f.text);
        let children = declared_children(&text);
        for path in paths(&text, &children) {
            let Some((target, name)) = resolve(&f.module, &children, &path, &modules) else { continue };
            let to = file_of[&target];
            if to != f.path {
                by_file.entry(f.path.clone()).or_default().entry(to.to_string()).or_default().insert(name.clone());
            }
            let top = |m: &[String], name: &str| m.first().cloned().unwrap_or_else(|| name.to_string());
            let (a, b) = (top(&f.module, "lib"), top(&target, &name));
            if a != b {
                by_module.entry(a).or_default().entry(b).or_default().insert(name);
            }
        }
    }
    (by_file, by_module)
}

/// The cycles of `graph`: its strongly connected components of more than one node, each with
/// the arrows inside it and the names that tie them.
fn cycles(graph: &Graph) -> Vec<String> {
    let nodes: BTreeSet<&String> = graph.keys().chain(graph.values().flat_map(|m| m.keys())).collect();
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from];
        while let Some(n) = todo.pop() {
            for next in graph.get(n).into_iter().flat_map(|m| m.keys()) {
                if seen.insert(next) {
                    todo.push(next);
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<&String>> = nodes.iter().map(|n| (*n, reach(n))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for n in &nodes {
        if done.contains(n) {
            continue;
        }
        let component: BTreeSet<&String> = nodes.iter().copied().filter(|m| m == n || (reaches[n].contains(m) && reaches[m].contains(n))).collect();
        done.extend(component.iter().copied());
        if component.len() < 2 {
            continue;
        }
        let mut report = format!("cycle of {}:", component.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "));
        for a in &component {
            for (b, names) in graph.get(*a).into_iter().flatten() {
                if component.contains(b) {
                    report.push_str(&format!("\n  {a} -> {b}: {}", names.iter().cloned().collect::<Vec<_>>().join(", ")));
                }
            }
        }
        out.push(report);
    }
    out
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = read_sources(&src);
    assert!(files.len() > 20, "read {} files under {}", files.len(), src.display());
    let (by_file, by_module) = graphs(&files);
    let mut problems = cycles(&by_module);
    for cycle in cycles(&by_file) {
        let files = cycle.lines().next().unwrap_or_default().trim_start_matches("cycle of ").trim_end_matches(':').to_string();
        let pending = PENDING_FILE_CYCLES_IN.iter().find(|dir| files.split(", ").all(|f| f.starts_with(**dir)));
        match pending {
            Some(dir) => eprintln!("pending (PENDING_FILE_CYCLES_IN {dir}): {cycle}"),
            None => problems.push(cycle),
        }
    }
    for (from, arrows) in by_file.iter().filter(|(f, _)| f.starts_with("src/codec/")) {
        for (to, names) in arrows.iter().filter(|(t, _)| !t.starts_with("src/codec/")) {
            let names = names.iter().cloned().collect::<Vec<_>>().join(", ");
            problems.push(format!("the codec is a leaf, but {from} -> {to}: {names}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn use_trees_expand() {
    let cases: &[(&str, &[&str])] = &[
        ("crate::metrics", &["crate::metrics"]),
        (" crate::codec::{frame, ValueCodec} ", &["crate::codec::frame", "crate::codec::ValueCodec"]),
        ("crate::{a, b::{c, d as e}, f::{self}}", &["crate::a", "crate::b::c", "crate::b::d", "crate::f"]),
        ("super::{self, x}", &["super", "super::x"]),
        ("std::sync::Arc", &["std::sync::Arc"]),
        ("crate::dictionary::{\n    cache::DictionaryCache,\n    Dictionaries,\n}", &["crate::dictionary::cache::DictionaryCache", "crate::dictionary::Dictionaries"]),
    ];
    for (tree, want) in cases {
        assert_eq!(expand_use(tree), want.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "{tree:?}");
    }
}

#[test]
fn paths_are_found_in_use_items_and_code() {
    let children: BTreeSet<String> = ["kv".to_string()].into();
    let cases: &[(&str, &[&str])] = &[
        ("use crate::codec::ValueCodec;", &["crate::codec::ValueCodec"]),
        ("pub use crate::{a::B, c};", &["crate::a::B", "crate::c"]),
        ("let m = crate::metrics::get();", &["crate::metrics::get"]),
        ("x(crate :: metrics :: get())", &["crate::metrics::get"]),
        ("let s = kv::KvService::new();", &["kv::KvService::new"]),
        ("fn f() -> super::Shared { self::g() }", &["super::Shared", "self::g"]),
        ("let v: Vec<u8> = std::mem::take(&mut x); other::thing();", &[]),
        ("let user = reuse::x; mod used;", &[]),
    ];
    for (text, want) in cases {
        assert_eq!(paths(&strip(text), &children), want.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "{text:?}");
    }
}

#[test]
fn comments_strings_and_tests_are_not_read() {
    let cases: &[(&str, &str)] = &[
        ("a // crate::x::y\nb", "a \nb"),
        ("a /* crate::x /* nested */ */ b", "a   b"),
        ("let s = \"crate::x::y \\\" still\";", "let s = \"\";"),
        ("let r = r#\"crate::x\"#;", "let r = \"\";"),
        ("let c = '\"'; let l: &'a str;", "let c = ' '; let l: &'a str;"),
        ("f();\n#[cfg(test)]\nmod tests { use crate::x; fn g() { {} } }\ng();", "f();\n\ng();"),
        ("#[cfg(test)]\nuse crate::x;\nh();", "\nh();"),
    ];
    for (text, want) in cases {
        assert_eq!(strip(text), *want, "{text:?}");
    }
}

#[test]
fn paths_resolve_to_the_longest_module_with_a_file() {
    let modules: BTreeSet<Vec<String>> =
        [vec![], vec!["codec".into()], vec!["codec".into(), "delta".into()], vec!["server".into()], vec!["server".into(), "kv".into()]].into();
    let codec_delta: Vec<String> = vec!["codec".into(), "delta".into()];
    let server: Vec<String> = vec!["server".into()];
    let kv: BTreeSet<String> = ["kv".to_string()].into();
    let none = BTreeSet::new();
    // (the file's module, its declared children, the path, the module and name it resolves to)
    type Case<'a> = (&'a [String], &'a BTreeSet<String>, &'a str, Option<(&'a [&'a str], &'a str)>);
    let cases: &[Case] = &[
        (&codec_delta, &none, "super::KeyDisplay", Some((&["codec"], "KeyDisplay"))),
        (&codec_delta, &none, "crate::codec::delta::Base", Some((&["codec", "delta"], "Base"))),
        (&codec_delta, &none, "crate::proto::mvccpb::KeyValue", Some((&[], "proto"))),
        (&server, &kv, "kv::KvService", Some((&["server", "kv"], "KvService"))),
        (&server, &none, "crate::codec", Some((&["codec"], "self"))),
        (&server, &none, "std::sync::Arc", None),
    ];
    for (module, children, path, want) in cases {
        let got = resolve(module, children, path, &modules);
        let want = want.map(|(m, n)| (m.iter().map(|s| s.to_string()).collect::<Vec<_>>(), n.to_string()));
        assert_eq!(got, want, "{path}");
    }
}

#[test]
fn cycles_name_their_arrows() {
    let mut g = Graph::new();
    let mut arrow = |a: &str, b: &str, n: &str| {
        g.entry(a.into()).or_default().entry(b.into()).or_default().insert(n.into());
    };
    arrow("a", "b", "B");
    arrow("b", "c", "C");
    arrow("c", "a", "A");
    arrow("c", "d", "D");
    assert_eq!(cycles(&g), vec!["cycle of a, b, c:\n  a -> b: B\n  b -> c: C\n  c -> a: A".to_string()]);
    g.remove("c");
    assert!(cycles(&g).is_empty());
}

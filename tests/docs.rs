//! The repository stands alone: its documents and its code point only at things it contains.
//!
//! - every relative link in a Markdown file resolves to a file or directory inside the repository, and
//!   a `#anchor` to a heading of the file it names;
//! - every `docs/...` path, and every other `*.md` path, named in the code, the shipped configuration,
//!   the unit, the alert rules or the scripts resolves from the repository's root (with its anchor);
//! - nothing names the sibling folder outside the repository that links once pointed into;
//! - the layout list in `src/lib.rs` and the code map in ARCHITECTURE.md name every module there is.
//!
//! Each test collects every finding before it fails, so one run lists everything to fix.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::LazyLock;

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};
use regex::Regex;

/// Folders the code lives in, whose files may name paths of the repository.
const CODE_DIRS: &[&str] = &[
    "src",
    "tests",
    "benches",
    "scripts",
    "config",
    "systemd",
    "prometheus",
    "fuzz",
];
/// Files at the root that are scanned like code.
const CODE_FILES: &[&str] = &["Dockerfile", "docker-compose.yml", "Cargo.toml"];

/// A path named in code: one under `docs/` (or under the folder name the old, dangling references
/// used), or any path ending in `.md`; not preceded by a path character, and not starting with `/`, so
/// absolute paths and URLs are left alone; with an optional `#anchor`.
static NAMED_PATH: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:^|[^\w./-])((?:docs|spec)/[\w./-]*|[\w.][\w./-]*\.md\b)(#[\w-]+)?")
        .expect("the pattern is valid")
});

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The sibling folder outside the repository that links once pointed into. Spelled in two pieces so
/// that this file does not name it itself.
fn outside_folder() -> String {
    ["..", "shared"].join("/")
}

/// Every file of the repository under `dir`, skipping build output, VCS data and hidden folders
/// (`.tools` is a link to installed tools, not part of the project).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        match entry.file_type() {
            Ok(t) if t.is_dir() => out.extend(files_under(&path)),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
    out.sort();
    out
}

fn is_markdown(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "md")
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// `base` joined with `rel`, `..` and `.` folded away; `None` when it climbs out of the repository.
fn resolve(base: &Path, rel: &str) -> Option<PathBuf> {
    let mut out = root();
    let start = base.strip_prefix(root()).unwrap_or(base);
    for c in start.join(rel).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::ParentDir if out != root() => {
                out.pop();
            }
            Component::ParentDir => return None,
            _ => {}
        }
    }
    Some(out)
}

/// GitHub's anchors for a document's headings: lower case, punctuation dropped, spaces as hyphens,
/// `-1`, `-2`... for repeats.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    let mut heading: Option<String> = None;
    for event in Parser::new_ext(markdown, Options::ENABLE_TABLES) {
        match event {
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                let base = slug(&heading.take().unwrap_or_default());
                let n = seen.entry(base.clone()).or_insert(0);
                out.insert(if *n == 0 {
                    base.clone()
                } else {
                    format!("{base}-{n}")
                });
                *n += 1;
            }
            _ => {}
        }
    }
    out
}

fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Why `target` (with `anchor`) does not resolve, or `None` when it does.
fn check_target(target: Option<PathBuf>, anchor: Option<&str>) -> Option<String> {
    let Some(target) = target else {
        return Some("points outside the repository".into());
    };
    if !target.exists() {
        return Some(format!("{} does not exist", relative(&target)));
    }
    let anchor = anchor.filter(|a| !a.is_empty())?;
    if !is_markdown(&target) {
        return None;
    }
    let text = std::fs::read_to_string(&target).unwrap_or_default();
    let known = anchors(&text);
    if known.contains(anchor) {
        None
    } else {
        Some(format!(
            "{} has no heading #{anchor} (it has: {})",
            relative(&target),
            known.into_iter().collect::<Vec<_>>().join(", ")
        ))
    }
}

/// True for links that leave the repository by design: URLs with a scheme.
fn is_external(dest: &str) -> bool {
    let scheme = dest.split_once(':').map(|(s, _)| s);
    scheme.is_some_and(|s| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
    })
}

/// The findings for one Markdown file's links: `file:line: link: why`.
fn broken_links(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (event, range) in Parser::new_ext(&text, Options::ENABLE_TABLES).into_offset_iter() {
        let dest = match event {
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => dest_url,
            _ => continue,
        };
        if is_external(&dest) {
            continue;
        }
        let (path, anchor) = match dest.split_once('#') {
            Some((p, a)) => (p, Some(a)),
            None => (dest.as_ref(), None),
        };
        let target = match path {
            "" => Some(file.to_path_buf()),
            p if p.starts_with('/') => resolve(&root(), p.trim_start_matches('/')),
            p => resolve(dir, p),
        };
        if let Some(why) = check_target(target, anchor) {
            let line = line_of(&text, range.start);
            out.push(format!("{}:{line}: ({dest}): {why}", relative(file)));
        }
    }
    out
}

/// The findings for one code file's named paths: `file:line: path: why`.
fn broken_named_paths(file: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Vec::new(); // not text: names nothing
    };
    let mut out = Vec::new();
    for caps in NAMED_PATH.captures_iter(&text) {
        let Some(path) = caps.get(1) else { continue };
        let name = path.as_str().trim_end_matches(['.', '-']);
        let anchor = caps.get(2).map(|a| &a.as_str()[1..]);
        if let Some(why) = check_target(resolve(&root(), name), anchor) {
            let line = line_of(&text, path.start());
            let named = format!(
                "{name}{}",
                anchor.map(|a| format!("#{a}")).unwrap_or_default()
            );
            out.push(format!("{}:{line}: {named}: {why}", relative(file)));
        }
    }
    out
}

fn code_files() -> Vec<PathBuf> {
    let root = root();
    let mut files: Vec<PathBuf> = CODE_DIRS
        .iter()
        .flat_map(|d| files_under(&root.join(d)))
        .filter(|f| !is_markdown(f))
        .collect();
    files.extend(
        CODE_FILES
            .iter()
            .map(|f| root.join(f))
            .filter(|f| f.exists()),
    );
    files
}

fn assert_none(what: &str, findings: Vec<String>) {
    assert!(
        findings.is_empty(),
        "{} {what}:\n{}",
        findings.len(),
        findings.join("\n")
    );
}

#[test]
fn every_relative_link_in_the_markdown_resolves_inside_the_repository() {
    let docs: Vec<PathBuf> = files_under(&root())
        .into_iter()
        .filter(|f| is_markdown(f))
        .collect();
    for expected in [
        "README.md",
        "ARCHITECTURE.md",
        "docs/README.md",
        "docs/lifecycle.md",
    ] {
        assert!(
            docs.contains(&root().join(expected)),
            "{expected} is not among the Markdown files found: {docs:?}"
        );
    }
    let findings = docs.iter().flat_map(|f| broken_links(f)).collect();
    assert_none("broken links in the Markdown files", findings);
}

#[test]
fn every_docs_path_named_in_the_code_resolves() {
    let files = code_files();
    assert!(
        files.contains(&root().join("src/lib.rs"))
            && files.contains(&root().join("prometheus/alerts.yml")),
        "the code files were not found: {files:?}"
    );
    let findings = files.iter().flat_map(|f| broken_named_paths(f)).collect();
    assert_none(
        "paths named in the code that do not resolve (contract documents live in docs/)",
        findings,
    );
}

#[test]
fn nothing_names_the_folder_beside_the_repository() {
    let needle = outside_folder();
    let findings = files_under(&root())
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).ok()?;
            let at = text.find(&needle)?;
            Some(format!(
                "{}:{}: names {needle}",
                relative(f),
                line_of(&text, at)
            ))
        })
        .collect();
    assert_none("files that point outside the repository", findings);
}

#[test]
fn the_layout_list_and_the_code_map_name_every_module() {
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).expect("reading src/lib.rs");
    let architecture =
        std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("reading ARCHITECTURE.md");
    let module = Regex::new(r"(?m)^pub mod (\w+);").expect("the pattern is valid");
    let modules: Vec<&str> = module
        .captures_iter(&lib)
        .filter_map(|c| c.get(1))
        .map(|m| m.as_str())
        .collect();
    assert!(
        modules.len() > 10,
        "too few modules found in src/lib.rs: {modules:?}"
    );
    let mut findings = Vec::new();
    for m in &modules {
        if !lib.contains(&format!("//! - [`{m}`]")) && !lib.contains(&format!("[`{m}`]:")) {
            findings.push(format!("src/lib.rs: the layout list does not name [`{m}`]"));
        }
        if !architecture.contains(&format!("`src/{m}.rs`"))
            && !architecture.contains(&format!("`src/{m}/"))
        {
            findings.push(format!(
                "ARCHITECTURE.md: the code map has no row for src/{m}"
            ));
        }
    }
    let listed = Regex::new(r"(?m)^//! - \[`(\w+)`\]").expect("the pattern is valid");
    for name in listed
        .captures_iter(&lib)
        .filter_map(|c| c.get(1))
        .map(|m| m.as_str())
    {
        if !modules.contains(&name) {
            findings.push(format!(
                "src/lib.rs: the layout list names [`{name}`], which is not a module"
            ));
        }
    }
    assert_none("gaps between the modules and their descriptions", findings);
}

#[test]
fn the_anchor_rules_match_what_the_documents_link_to() {
    // The slugs GitHub gives headings with code, punctuation and dashes; the docs link to these.
    let text = "# Title\n## `[daemon]`\n### `kind = \"http\"` — any vendor, described\n## 6. Outcome\n## Title\n";
    let got = anchors(text);
    for want in [
        "title",
        "daemon",
        "kind--http--any-vendor-described",
        "6-outcome",
        "title-1",
    ] {
        assert!(got.contains(want), "no #{want} in {got:?}");
    }
    // Paths named in code: found with their anchor, but not inside absolute paths or URLs.
    let line = "see docs/lifecycle.md#ambiguous-regenerate, /usr/share/doc/x/install.md, \
                https://h/docs/a.md and (README.md).";
    let names: Vec<(&str, Option<&str>)> = NAMED_PATH
        .captures_iter(line)
        .map(|c| {
            (
                c.get(1).map_or("", |m| m.as_str()),
                c.get(2).map(|m| m.as_str()),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("docs/lifecycle.md", Some("#ambiguous-regenerate")),
            ("README.md", None)
        ]
    );
    assert!(is_external("https://example.com") && is_external("mailto:a@b"));
    assert!(!is_external("docs/README.md") && !is_external("#anchor"));
    assert_eq!(
        resolve(&root(), "../x"),
        None,
        "climbing out of the repository is refused"
    );
    assert_eq!(
        resolve(&root().join("docs"), "../Cargo.toml"),
        Some(root().join("Cargo.toml"))
    );
}

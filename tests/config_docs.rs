//! docs/configuration.md against the binary itself, so the reference cannot drift: every flag in
//! every command's `--help` is documented in that command's section (and nothing documented there
//! is gone), every environment variable the help names or the source reads is documented, and
//! every command has its `[command]` table in the config file section.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

const DOC: &str = "docs/configuration.md";

fn doc() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(DOC))
        .unwrap_or_else(|e| panic!("cannot read {DOC}: {e}"))
}

fn help(words: &[&str]) -> String {
    let out = common::command()
        .args(words)
        .arg("--help")
        .env("COLUMNS", "100")
        .output()
        .expect("run cutoverfs --help");
    assert!(out.status.success(), "cutoverfs {words:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Long flags listed in a help text (`--name`).
fn flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = match line.split_once(", ") {
                Some((short, rest)) if short.len() == 2 && short.starts_with('-') => rest,
                _ => line,
            };
            let name = line.strip_prefix("--")?;
            let name: String = name
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Subcommand names listed under `Commands:` in a help text.
fn subcommands(help: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line.trim_end() == "Commands:" {
            inside = true;
            continue;
        }
        if inside {
            if line.trim().is_empty() || !line.starts_with(' ') {
                break;
            }
            // Continuation lines of a wrapped description are indented further.
            if line.starts_with("  ") && !line.starts_with("   ") {
                let name = line.split_whitespace().next().unwrap();
                if name != "help" {
                    names.push(name.to_string());
                }
            }
        }
    }
    names
}

/// `[env: NAME=]` (or `[env: NAME]` where the value is hidden) markers of a help text
/// (wrapped lines joined first).
fn env_vars(help: &str) -> BTreeSet<String> {
    let joined = help.split_whitespace().collect::<Vec<_>>().join(" ");
    joined
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next().map(str::to_string))
        .collect()
}

/// Every command path (`["sweep"]`, `["log", "show"]`...) with its help text.
fn all_commands() -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    let mut todo: Vec<Vec<String>> = subcommands(&help(&[]))
        .into_iter()
        .map(|name| vec![name])
        .collect();
    while let Some(words) = todo.pop() {
        let refs: Vec<&str> = words.iter().map(String::as_str).collect();
        let text = help(&refs);
        for sub in subcommands(&text) {
            let mut deeper = words.clone();
            deeper.push(sub);
            todo.push(deeper);
        }
        out.push((words, text));
    }
    out.sort();
    out
}

/// The text under the heading that is exactly "`cutoverfs WORDS`" (any level), up to the next
/// heading.
fn section<'a>(doc: &'a str, title: &str) -> Option<&'a str> {
    let mut lines = doc.split_inclusive('\n');
    let mut start = 0;
    for line in lines.by_ref() {
        start += line.len();
        let heading = line.trim_start_matches('#');
        if line.starts_with('#') && heading.trim() == title {
            let rest = &doc[start..];
            let end = rest
                .lines()
                .scan(0, |at, l| {
                    let here = *at;
                    *at += l.len() + 1;
                    Some((here, l))
                })
                .find(|(_, l)| l.starts_with('#'))
                .map_or(rest.len(), |(at, _)| at);
            return Some(&rest[..end]);
        }
    }
    None
}

/// The sections a section links to on this page (`[target options](#target-options)`).
fn linked_sections<'a>(doc: &'a str, body: &str) -> Vec<&'a str> {
    body.split("](#")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .filter_map(|anchor| {
            let title = doc
                .lines()
                .filter(|l| l.starts_with('#'))
                .map(|l| l.trim_start_matches('#').trim())
                .find(|title| slug(title) == anchor)?;
            section(doc, title)
        })
        .collect()
}

/// A heading's anchor as GitHub makes it.
fn slug(title: &str) -> String {
    title
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Flags named in the first column of a section's tables (`| `--name` ... |`).
fn table_flags(section: &str) -> BTreeSet<String> {
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `--"))
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect()
        })
        .collect()
}

#[test]
fn every_flag_of_every_command_is_documented_in_its_section() {
    let doc = doc();
    let global = flags(&help(&[]));
    let global_doc = section(&doc, "Global options")
        .unwrap_or_else(|| panic!("{DOC} has no \"Global options\" heading"));
    let mut problems = Vec::new();
    for flag in &global {
        if !table_flags(global_doc).contains(flag) {
            problems.push(format!(
                "global option --{flag} is not in the Global options table"
            ));
        }
    }
    for flag in table_flags(global_doc).difference(&global) {
        problems.push(format!(
            "Global options documents --{flag}, which `cutoverfs --help` does not list"
        ));
    }
    for (words, text) in all_commands() {
        let title = format!("`cutoverfs {}`", words.join(" "));
        let Some(body) = section(&doc, &title) else {
            problems.push(format!("no heading {title}"));
            continue;
        };
        let own: BTreeSet<String> = flags(&text).difference(&global).cloned().collect();
        let mut documented = table_flags(body);
        for group in linked_sections(&doc, body) {
            documented.extend(table_flags(group));
        }
        for flag in own.difference(&documented) {
            problems.push(format!(
                "{title}: --{flag} is not in the section's flag table"
            ));
        }
        for flag in documented.difference(&own) {
            problems.push(format!(
                "{title}: documents --{flag}, which its --help does not list"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{DOC} drifted from --help:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_environment_variable_is_documented() {
    let doc = doc();
    let env_doc = section(&doc, "Environment variables")
        .unwrap_or_else(|| panic!("{DOC} has no \"Environment variables\" heading"));
    let mut wanted = BTreeSet::new();
    wanted.extend(env_vars(&help(&[])));
    for (_, text) in all_commands() {
        wanted.extend(env_vars(&text));
    }
    // Variables the code reads by name, outside clap.
    wanted.extend(string_literals_like(&["CUTOVERFS_", "AWS_"]));
    let missing: Vec<_> = wanted
        .iter()
        .filter(|name| !env_doc.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "{DOC} \"Environment variables\" does not document {missing:?}"
    );
}

#[test]
fn every_command_has_its_config_table_documented() {
    let doc = doc();
    let config_doc = section(&doc, "Config file")
        .unwrap_or_else(|| panic!("{DOC} has no \"Config file\" heading"));
    let missing: Vec<String> = subcommands(&help(&[]))
        .into_iter()
        .filter(|name| !config_doc.contains(&format!("`[{name}]`")))
        .collect();
    assert!(
        missing.is_empty(),
        "{DOC} \"Config file\" does not name the tables {missing:?}"
    );
}

/// `"PREFIX..."` string literals in src/ that look like environment variable names.
fn string_literals_like(prefixes: &[&str]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for prefix in prefixes {
                let quoted = format!("\"{prefix}");
                for (at, _) in text.match_indices(&quoted) {
                    let rest = &text[at + 1..];
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    if rest[name.len()..].starts_with('"') {
                        found.insert(name);
                    }
                }
            }
        }
    }
    found
}

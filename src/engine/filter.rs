//! `--include` / `--exclude` globs and `--files-from` lists: which paths a command acts on.

use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};

use super::file_list::FileList;

/// A path is in scope when it matches an include glob (or none were given) and no exclude glob,
/// and, with a file list, is on the list: both must agree.
/// Globs match the path relative to the source root; `*` also crosses `/`, so `*.pdf` matches at
/// any depth and `documents/**` everything under `documents/`.
#[derive(Debug, Clone, Default)]
pub struct PathFilter {
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
    text: Vec<String>,
    /// Shared, not copied: the sweeper clones its filter often, and a list may hold millions.
    list: Option<Arc<FileList>>,
}

#[derive(Debug, thiserror::Error)]
#[error("bad glob {glob:?}: {why}")]
pub struct BadGlob {
    pub glob: String,
    pub why: String,
}

impl PathFilter {
    pub fn new(include: &[String], exclude: &[String]) -> Result<Self, BadGlob> {
        let text = include
            .iter()
            .map(|g| format!("+{g}"))
            .chain(exclude.iter().map(|g| format!("-{g}")))
            .collect();
        Ok(PathFilter {
            include: build(include)?,
            exclude: build(exclude)?,
            text,
            list: None,
        })
    }

    /// The same globs, restricted to the paths of `list` as well (or no longer, with None).
    pub fn with_list(mut self, list: Option<Arc<FileList>>) -> Self {
        self.list = list;
        self
    }

    pub fn list(&self) -> Option<&FileList> {
        self.list.as_deref()
    }

    pub fn matches(&self, path: &str) -> bool {
        self.matches_globs(path) && self.is_listed(path)
    }

    /// Whether the globs alone take `path` (the list aside).
    pub fn matches_globs(&self, path: &str) -> bool {
        self.include.as_ref().is_none_or(|set| set.is_match(path))
            && !self.exclude.as_ref().is_some_and(|set| set.is_match(path))
    }

    /// Whether the list (if any) names `path`.
    pub fn is_listed(&self, path: &str) -> bool {
        self.list.as_ref().is_none_or(|list| list.contains(path))
    }

    pub fn is_everything(&self) -> bool {
        self.include.is_none() && self.exclude.is_none() && self.list.is_none()
    }

    /// A short description for logs and summaries.
    pub fn describe(&self) -> String {
        let mut parts = self.text.clone();
        if let Some(list) = &self.list {
            parts.push(format!(
                "files-from {} ({} paths)",
                list.origin(),
                list.len()
            ));
        }
        if parts.is_empty() {
            "all".to_string()
        } else {
            parts.join(" ")
        }
    }
}

fn build(globs: &[String]) -> Result<Option<GlobSet>, BadGlob> {
    if globs.is_empty() {
        return Ok(None);
    }
    let mut builder = GlobSetBuilder::new();
    for glob in globs {
        let parsed = Glob::new(glob.trim_start_matches('/')).map_err(|e| BadGlob {
            glob: glob.clone(),
            why: e.kind().to_string(),
        })?;
        builder.add(parsed);
    }
    builder.build().map(Some).map_err(|e| BadGlob {
        glob: globs.join(" "),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_and_exclude_combine() {
        let f = PathFilter::new(
            &["documents/**".into(), "*.pdf".into()],
            &["**/tmp/**".into()],
        )
        .unwrap();
        assert!(f.matches("documents/2025/01/19/invoice.pdf"));
        assert!(f.matches("contracts/documents/R5/C10/contract.pdf"));
        assert!(!f.matches("missions/expenses/R1/M2/receipt.jpg"));
        assert!(!f.matches("documents/tmp/x.pdf"));
        assert!(PathFilter::default().matches("anything"));
    }

    #[test]
    fn a_list_and_globs_must_both_take_a_path() {
        let list = FileList::parse(
            &b"documents/a.pdf\ndocuments/b.jpg\nother/c.pdf\n"[..],
            super::super::file_list::Separator::Newline,
            "list".into(),
        )
        .unwrap();
        let f = PathFilter::new(&["documents/**".into()], &["*.jpg".into()])
            .unwrap()
            .with_list(Some(Arc::new(list)));
        assert!(f.matches("documents/a.pdf"));
        assert!(!f.matches("documents/b.jpg"), "excluded by a glob");
        assert!(!f.matches("other/c.pdf"), "not included by a glob");
        assert!(!f.matches("documents/d.pdf"), "not listed");
        assert!(f.matches_globs("documents/d.pdf"));
        assert!(!f.is_everything());
        assert!(
            f.describe().contains("files-from list (3 paths)"),
            "{}",
            f.describe()
        );
    }

    #[test]
    fn a_bad_glob_is_named() {
        let err = PathFilter::new(&["docs/[".into()], &[]).unwrap_err();
        assert!(err.to_string().contains("docs/["), "{err}");
    }
}

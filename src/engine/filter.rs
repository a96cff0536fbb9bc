//! `--include` / `--exclude` globs: which paths a command acts on.

use globset::{Glob, GlobSet, GlobSetBuilder};

/// A path is in scope when it matches an include glob (or none were given) and no exclude glob.
/// Globs match the path relative to the source root; `*` also crosses `/`, so `*.pdf` matches at
/// any depth and `documents/**` everything under `documents/`.
#[derive(Debug, Clone, Default)]
pub struct PathFilter {
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
    text: Vec<String>,
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
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        self.include.as_ref().is_none_or(|set| set.is_match(path))
            && !self.exclude.as_ref().is_some_and(|set| set.is_match(path))
    }

    pub fn is_everything(&self) -> bool {
        self.include.is_none() && self.exclude.is_none()
    }

    /// A short description for logs and summaries.
    pub fn describe(&self) -> String {
        if self.text.is_empty() {
            "all".to_string()
        } else {
            self.text.join(" ")
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
    fn a_bad_glob_is_named() {
        let err = PathFilter::new(&["docs/[".into()], &[]).unwrap_err();
        assert!(err.to_string().contains("docs/["), "{err}");
    }
}

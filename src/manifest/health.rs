//! What `cutoverfs doctor` learns of a manifest without changing it: whether it is there, its
//! schema version against the one this binary knows, SQLite's own integrity check, and the
//! source and dest it records.

use sqlx::Row;

use super::{Manifest, ManifestUrl, Pair, Result};

/// A manifest as found.
#[derive(Debug, Clone)]
pub struct Health {
    /// Schema migrations applied to it.
    pub schema: i64,
    /// Schema migrations this binary knows.
    pub known_schema: i64,
    /// SQLite's `quick_check` answer ("ok" when sound); None for PostgreSQL.
    pub integrity: Option<String>,
    pub pair: Option<Pair>,
}

impl Manifest {
    /// Looks at an existing manifest without migrating or creating anything; None when there
    /// is none (no file, an empty one, or a database without our schema).
    pub async fn health(url: &ManifestUrl) -> Result<Option<Health>> {
        let known_schema = match url {
            ManifestUrl::Sqlite(path) => {
                match std::fs::metadata(path) {
                    Ok(meta) if meta.len() > 0 => {}
                    _ => return Ok(None),
                }
                sqlx::migrate!("src/manifest/migrations/sqlite")
                    .iter()
                    .count()
            }
            ManifestUrl::Postgres(_) => sqlx::migrate!("src/manifest/migrations/postgres")
                .iter()
                .count(),
        } as i64;
        let manifest = Self::connect(url, true).await?;
        let found = manifest.health_of(url, known_schema).await;
        manifest.close().await;
        found
    }

    async fn health_of(&self, url: &ManifestUrl, known_schema: i64) -> Result<Option<Health>> {
        let integrity = match url {
            ManifestUrl::Sqlite(_) => {
                let rows = sqlx::query("PRAGMA quick_check")
                    .fetch_all(&self.pool)
                    .await?;
                let said: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                Some(said.join("; "))
            }
            ManifestUrl::Postgres(_) => None,
        };
        if integrity.as_deref().is_some_and(|said| said != "ok") {
            return Ok(Some(Health {
                schema: 0,
                known_schema,
                integrity,
                pair: None,
            }));
        }
        let schema: i64 =
            match sqlx::query("SELECT COUNT(*) FROM _sqlx_migrations WHERE success = TRUE")
                .fetch_one(&self.pool)
                .await
            {
                Ok(row) => row.get(0),
                // No migrations table: not a manifest (yet).
                Err(_) => return Ok(None),
            };
        let pair = if schema > 0 { self.pair().await? } else { None };
        Ok(Some(Health {
            schema,
            known_schema,
            integrity,
            pair,
        }))
    }
}

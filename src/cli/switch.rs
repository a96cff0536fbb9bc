//! `cutoverfs switch-settings --framework django`: the settings that point the application's
//! storage at the dest once the cutover is done (docs/runbook.md, step 5), printed from the
//! manifest's dest so nothing is typed by hand. For an S3 dest, django-storages' `S3Storage`
//! with `location` = the dest prefix (DESIGN §2 "key": the keys are the paths); for a `file://`
//! dest, Django's `FileSystemStorage` with the new root.
//!
//! Owns: turning a dest into a framework's settings. Reads the manifest (the recorded dest and
//! the counts by state) and nothing else: it never reaches the dest and changes nothing.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use super::{exit, with_existing_manifest, Target};
use crate::manifest::{Manifest, State};
use crate::store::s3::{S3Settings, Sse};
use crate::store::DestUrl;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Framework {
    /// Django 4.2+: a `STORAGES` setting (django-storages for an S3 dest).
    Django,
}

#[derive(Debug, Clone, Args)]
pub struct SwitchSettingsArgs {
    #[command(flatten)]
    pub target: Target,
    /// The application's framework, whose settings are printed.
    #[arg(long, value_enum, value_name = "NAME")]
    pub framework: Framework,
    /// How long a signed URL of a private object stays valid (S3 dests).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_expiry)]
    pub url_expiry: Duration,
}

fn parse_expiry(text: &str) -> Result<Duration, String> {
    let expiry = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    // S3 refuses SigV4 signatures valid for more than 7 days, and less than a second is none.
    if expiry < Duration::from_secs(1) || expiry > Duration::from_secs(7 * 24 * 3600) {
        return Err(format!(
            "{text:?}: a signed URL lives from 1s to 7 days (S3's limit)"
        ));
    }
    Ok(expiry)
}

pub async fn run(args: SwitchSettingsArgs) -> Result<u8> {
    with_existing_manifest(&args.target, async |manifest| {
        let Some(pair) = manifest.pair().await? else {
            bail!(
                "manifest {} records no dest yet: run `cutoverfs sweep` (or mount) first",
                manifest.location()
            );
        };
        if let Some(dest) = &args.target.dest {
            // Same check as every other command: the flag must name the recorded dest.
            let given = DestUrl::parse(dest)?;
            let recorded = DestUrl::parse(&pair.dest)?;
            if !same_dest(&given, &recorded) {
                bail!(
                    "--dest {dest} is not the dest recorded in manifest {}: {}",
                    manifest.location(),
                    pair.dest
                );
            }
        }
        let settings = match DestUrl::parse(&pair.dest)? {
            DestUrl::Local(root) => Settings::Local {
                root: root.display().to_string(),
            },
            DestUrl::S3(location) => {
                let s3 = S3Settings::resolve(&location, &args.target.s3.flags())
                    .map_err(anyhow::Error::msg)?;
                Settings::S3(Box::new(s3))
            }
        };
        let unfinished = unfinished_files(manifest).await?;
        let header = Header {
            source: &pair.source,
            dest: &pair.dest,
            manifest: manifest.location(),
            unfinished,
        };
        if unfinished > 0 {
            eprintln!(
                "cutoverfs switch-settings: warning: {unfinished} files are not verified at the dest \
                 yet; the application would not find them there. Finish the sweep and run \
                 `cutoverfs verify` (see `cutoverfs status`) before switching."
            );
        }
        print!(
            "{}",
            match args.framework {
                Framework::Django => django(&header, &settings, args.url_expiry)?,
            }
        );
        Ok(exit::OK)
    })
    .await
}

/// Two dest URLs name the same place (bucket and prefix, or root); the settings riding on an
/// s3:// URL (region, path style) do not make it another dest.
fn same_dest(a: &DestUrl, b: &DestUrl) -> bool {
    match (a, b) {
        (DestUrl::Local(a), DestUrl::Local(b)) => {
            std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok()
        }
        (DestUrl::S3(a), DestUrl::S3(b)) => a.bucket == b.bucket && a.prefix == b.prefix,
        _ => false,
    }
}

/// Files the application would expect at the dest that are not verified there yet.
async fn unfinished_files(manifest: &Manifest) -> Result<u64> {
    Ok(manifest
        .count_by_state()
        .await?
        .into_iter()
        .filter(|(state, _, _)| {
            matches!(
                state,
                State::Pending | State::Copying | State::Copied | State::Failed | State::Conflict
            )
        })
        .map(|(_, count, _)| count)
        .sum())
}

enum Settings {
    Local { root: String },
    S3(Box<S3Settings>),
}

struct Header<'a> {
    source: &'a str,
    dest: &'a str,
    manifest: &'a str,
    unfinished: u64,
}

/// A Python string literal: JSON's escapes are Python's for every character.
fn py(text: &str) -> String {
    serde_json::to_string(text).expect("a string always serializes")
}

fn django(header: &Header, settings: &Settings, url_expiry: Duration) -> Result<String> {
    let mut out = String::new();
    out.push_str(&format!(
        "# Django settings after the cutover of {} to {}\n\
         # (from manifest {}, by `cutoverfs switch-settings --framework django`).\n",
        header.source, header.dest, header.manifest
    ));
    if header.unfinished > 0 {
        out.push_str(&format!(
            "# WARNING: {} files are not verified at the dest yet: do not switch before they are.\n",
            header.unfinished
        ));
    }
    match settings {
        Settings::Local { root } => django_local(&mut out, root),
        Settings::S3(s3) => django_s3(&mut out, s3, url_expiry),
    }
    out.push_str(
        "    # Keep your own \"staticfiles\" entry if you have one: setting STORAGES replaces both.\n    \
         \"staticfiles\": {\"BACKEND\": \"django.contrib.staticfiles.storage.StaticFilesStorage\"},\n\
         }\n",
    );
    Ok(out)
}

fn django_local(out: &mut String, root: &str) {
    out.push_str(&format!(
        "# The files keep their relative paths below the new root; MEDIA_URL stays as it is.\n\
         MEDIA_ROOT = {root}\n\
         STORAGES = {{\n    \
         \"default\": {{\n        \
         \"BACKEND\": \"django.core.files.storage.FileSystemStorage\",\n        \
         \"OPTIONS\": {{\"location\": MEDIA_ROOT}},\n    \
         }},\n",
        root = py(root)
    ));
}

fn django_s3(out: &mut String, s3: &S3Settings, url_expiry: Duration) {
    out.push_str(
        "# Needs django-storages 1.14+ with boto3: pip install \"django-storages[s3]\".\n\
         # Credentials: the standard AWS chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a\n\
         # profile), as for cutoverfs. The objects are private (cutoverfs sets no ACL): url() gives\n\
         # signed URLs. The keys are the old paths below `location`, so every stored name resolves.\n",
    );
    let mut options: Vec<(&str, String)> = vec![
        ("bucket_name", py(&s3.bucket)),
        ("location", py(s3.prefix.trim_end_matches('/'))),
    ];
    if let Some(endpoint) = &s3.endpoint {
        options.push(("endpoint_url", py(endpoint)));
    }
    match (&s3.region, &s3.endpoint) {
        (Some(region), _) => options.push(("region_name", py(region))),
        // What cutoverfs signs with against a server other than AWS (src/store/s3).
        (None, Some(_)) => options.push(("region_name", py("us-east-1"))),
        (None, None) => {}
    }
    if let Some(profile) = &s3.profile {
        options.push(("session_profile", py(profile)));
    }
    options.extend([
        (
            "addressing_style",
            py(if s3.path_style { "path" } else { "virtual" }),
        ),
        ("signature_version", py("s3v4")),
        ("default_acl", "None".into()),
        ("querystring_auth", "True".into()),
        ("querystring_expire", url_expiry.as_secs().to_string()),
        ("file_overwrite", "False".into()),
    ]);
    let parameters = object_parameters(s3);
    if !parameters.is_empty() {
        let inner: Vec<String> = parameters
            .iter()
            .map(|(k, v)| format!("{}: {}", py(k), py(v)))
            .collect();
        options.push(("object_parameters", format!("{{{}}}", inner.join(", "))));
    }
    out.push_str(
        "STORAGES = {\n    \"default\": {\n        \"BACKEND\": \"storages.backends.s3.S3Storage\",\n        \"OPTIONS\": {\n",
    );
    for (key, value) in options {
        out.push_str(&format!("            {}: {value},\n", py(key)));
    }
    out.push_str("        },\n    },\n");
}

/// What cutoverfs puts on every object it writes, so uploads after the switch get the same.
fn object_parameters(s3: &S3Settings) -> Vec<(&'static str, String)> {
    let mut parameters = Vec::new();
    if let Some(cache_control) = &s3.cache_control {
        parameters.push(("CacheControl", cache_control.clone()));
    }
    match &s3.sse {
        Some(Sse::Aes256) => parameters.push(("ServerSideEncryption", "AES256".into())),
        Some(Sse::Kms { key_id }) => {
            parameters.push(("ServerSideEncryption", "aws:kms".into()));
            if let Some(key_id) = key_id {
                parameters.push(("SSEKMSKeyId", key_id.clone()));
            }
        }
        None => {}
    }
    if let Some(class) = &s3.storage_class {
        parameters.push(("StorageClass", class.clone()));
    }
    parameters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_literals_escape_what_python_would_misread() {
        assert_eq!(py("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(py("é"), "\"é\"");
    }

    /// AWS itself: no endpoint, virtual-hosted addressing, the region and encryption given.
    #[test]
    fn aws_settings_carry_no_endpoint_and_address_by_host() {
        let location = crate::store::s3::S3Location {
            bucket: "media-bucket".into(),
            prefix: "media/".into(),
            ..Default::default()
        };
        let flags = crate::store::S3Flags {
            region: Some("eu-west-1".into()),
            sse: Some("aws:kms".into()),
            sse_kms_key_id: Some("key-1".into()),
            storage_class: Some("STANDARD_IA".into()),
            ..Default::default()
        };
        let s3 = S3Settings::resolve(&location, &flags).unwrap();
        let header = Header {
            source: "/srv/media",
            dest: "s3://media-bucket/media",
            manifest: "sqlite:///m.db",
            unfinished: 0,
        };
        let text = django(
            &header,
            &Settings::S3(Box::new(s3)),
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(!text.contains("endpoint_url"), "{text}");
        for expected in [
            "\"location\": \"media\",",
            "\"region_name\": \"eu-west-1\",",
            "\"addressing_style\": \"virtual\",",
            "\"querystring_expire\": 60,",
            "\"object_parameters\": {\"CacheControl\": \"max-age=86400\", \"ServerSideEncryption\": \"aws:kms\", \"SSEKMSKeyId\": \"key-1\", \"StorageClass\": \"STANDARD_IA\"},",
        ] {
            assert!(text.contains(expected), "no {expected} in\n{text}");
        }
    }

    #[test]
    fn expiry_is_bounded_by_what_s3_signs() {
        assert_eq!(parse_expiry("90m").unwrap(), Duration::from_secs(5400));
        assert!(parse_expiry("0s").is_err());
        assert!(parse_expiry("8days").is_err());
        assert!(parse_expiry("soon").is_err());
    }
}

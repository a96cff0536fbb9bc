//! Where an S3 dest is and how to talk to it: the `s3://bucket/prefix?...` URL, the `--s3-*`
//! flags, and the rule that a flag beats the URL and the URL beats the environment (DESIGN §2).

use std::time::Duration;

use super::super::BadDestUrl;

/// What the URL says: the bucket, the key prefix, and the settings that may ride on it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct S3Location {
    pub bucket: String,
    /// Empty, or ends with '/'.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
}

const URL_KEYS: &str = "endpoint, region, path_style";

impl S3Location {
    pub fn parse(text: &str, url: &url::Url) -> Result<S3Location, BadDestUrl> {
        let bad = |why: String| BadDestUrl {
            url: text.to_string(),
            why,
        };
        let bucket = url.host_str().unwrap_or_default().to_string();
        if !valid_bucket(&bucket) {
            return Err(bad(format!(
                "{bucket:?} is not a valid bucket name (3-63 characters: a-z, 0-9, '.', '-'); expected s3://BUCKET/PREFIX"
            )));
        }
        if url.port().is_some() || !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "an s3:// URL takes no port or credentials; give the endpoint as ?endpoint=URL and credentials through the AWS environment or profile".into(),
            ));
        }
        if url.fragment().is_some() {
            return Err(bad("an s3:// URL takes no #fragment".into()));
        }
        let raw_prefix = url.path().trim_matches('/');
        let prefix = percent_decode(raw_prefix).map_err(|e| bad(e.to_string()))?;
        if !prefix.is_empty()
            && prefix
                .split('/')
                .any(|segment| segment.is_empty() || segment == ".")
        {
            return Err(bad(
                "the prefix may not contain empty or '.' segments".into()
            ));
        }
        let mut location = S3Location {
            bucket,
            prefix: if prefix.is_empty() {
                prefix
            } else {
                format!("{prefix}/")
            },
            ..Default::default()
        };
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "endpoint" => {
                    location.endpoint = Some(
                        check_endpoint(&value).map_err(|why| bad(format!("endpoint: {why}")))?,
                    )
                }
                "region" if !value.is_empty() => location.region = Some(value.into_owned()),
                "path_style" => {
                    location.path_style = Some(parse_bool(&value).ok_or_else(|| {
                        bad(format!("path_style={value:?}: expected true or false"))
                    })?)
                }
                other => {
                    return Err(bad(format!(
                        "unknown option {other:?} in the URL; known: {URL_KEYS}"
                    )))
                }
            }
        }
        Ok(location)
    }
}

/// The operator's S3 settings beyond the URL (flags or config keys).
#[derive(Debug, Clone, Default)]
pub struct S3Flags {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
    pub profile: Option<String>,
    pub cache_control: Option<String>,
    pub sse: Option<String>,
    pub sse_kms_key_id: Option<String>,
    pub storage_class: Option<String>,
    pub part_size: Option<u64>,
    pub multipart_threshold: Option<u64>,
    pub upload_memory: Option<u64>,
}

/// Everything the store needs, resolved.
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub prefix: String,
    /// `None`: the SDK's own resolution (AWS, or the profile's `endpoint_url`).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub profile: Option<String>,
    pub cache_control: Option<String>,
    pub sse: Option<Sse>,
    pub storage_class: Option<String>,
    pub part_size: u64,
    pub multipart_threshold: u64,
    /// Bytes of file data held in memory for uploads at once, across all files.
    pub upload_memory: u64,
    pub timeouts: Timeouts,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    Aes256,
    Kms { key_id: Option<String> },
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub attempt: Duration,
    pub max_attempts: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            read: Duration::from_secs(60),
            attempt: Duration::from_secs(300),
            max_attempts: 4,
        }
    }
}

pub const DEFAULT_CACHE_CONTROL: &str = "max-age=86400";
pub const DEFAULT_PART_SIZE: u64 = 16 << 20;
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 64 << 20;
pub const DEFAULT_UPLOAD_MEMORY: u64 = 512 << 20;
/// S3's limits on parts: 5 MiB at least (but the last), 5 GiB at most, 10,000 of them.
pub const MIN_PART_SIZE: u64 = 5 << 20;
pub const MAX_PART_SIZE: u64 = 5 << 30;
pub const MAX_PARTS: u64 = 10_000;

impl S3Settings {
    /// Flag beats URL beats environment (`AWS_ENDPOINT_URL[_S3]`, `AWS_REGION`).
    pub fn resolve(location: &S3Location, flags: &S3Flags) -> Result<S3Settings, String> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let endpoint = match flags.endpoint.clone().or(location.endpoint.clone()) {
            Some(endpoint) => Some(endpoint),
            None => env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL")),
        }
        .map(|e| check_endpoint(&e).map_err(|why| format!("S3 endpoint: {why}")))
        .transpose()?;
        let region = flags
            .region
            .clone()
            .or(location.region.clone())
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"));
        // Servers other than AWS are reached by path, as most of them need (rclone does the same).
        let path_style = flags
            .path_style
            .or(location.path_style)
            .unwrap_or(endpoint.is_some());
        let sse = match flags.sse.as_deref() {
            None | Some("") | Some("none") => {
                if flags.sse_kms_key_id.is_some() {
                    return Err("--s3-sse-kms-key-id needs --s3-sse aws:kms".into());
                }
                None
            }
            Some("AES256") => Some(Sse::Aes256),
            Some("aws:kms") => Some(Sse::Kms {
                key_id: flags.sse_kms_key_id.clone(),
            }),
            Some(other) => {
                return Err(format!(
                    "--s3-sse {other:?}: expected AES256, aws:kms or none"
                ))
            }
        };
        let part_size = flags.part_size.unwrap_or(DEFAULT_PART_SIZE);
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size) {
            return Err(format!(
                "--s3-part-size {part_size}: S3 parts are 5 MiB to 5 GiB"
            ));
        }
        let multipart_threshold = flags
            .multipart_threshold
            .unwrap_or(DEFAULT_MULTIPART_THRESHOLD);
        if multipart_threshold > MAX_PART_SIZE {
            return Err("--s3-multipart-threshold: a single PUT holds at most 5 GiB".into());
        }
        let upload_memory = flags.upload_memory.unwrap_or(DEFAULT_UPLOAD_MEMORY);
        if upload_memory < part_size.max(multipart_threshold.min(part_size)) {
            return Err(format!(
                "--s3-upload-memory {upload_memory}: must hold at least one part ({part_size} bytes)"
            ));
        }
        Ok(S3Settings {
            bucket: location.bucket.clone(),
            prefix: location.prefix.clone(),
            endpoint,
            region,
            path_style,
            profile: flags.profile.clone(),
            cache_control: match flags.cache_control.as_deref() {
                None => Some(DEFAULT_CACHE_CONTROL.to_string()),
                Some("") => None,
                Some(value) => Some(value.to_string()),
            },
            sse,
            storage_class: flags.storage_class.clone(),
            part_size,
            multipart_threshold,
            upload_memory,
            timeouts: Timeouts::default(),
        })
    }

    /// The dest as recorded in the manifest: bucket, prefix and, when one is set, the endpoint
    /// (another server is another dest).
    pub fn canonical_url(&self) -> String {
        let prefix = self.prefix.trim_end_matches('/');
        let mut url = format!("s3://{}/{}", self.bucket, prefix);
        if let Some(endpoint) = &self.endpoint {
            url.push_str("?endpoint=");
            url.push_str(endpoint);
        }
        url
    }

    /// The part size for a file: the configured size, grown so the file fits in 10,000 parts.
    pub fn part_size_for(&self, size: u64) -> u64 {
        self.part_size.max(size.div_ceil(MAX_PARTS))
    }
}

fn check_endpoint(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text).map_err(|e| format!("{text:?}: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        // Not repeated: the text holds a credential.
        return Err(
            "an endpoint takes no user or password; give credentials through the AWS environment or profile"
                .into(),
        );
    }
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "{text:?}: expected http://HOST[:PORT] or https://HOST[:PORT]"
        ));
    }
    Ok(text.trim_end_matches('/').to_string())
}

fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// Bucket names as S3 allows them today (lower case, digits, dots, hyphens).
fn valid_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

fn percent_decode(text: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = || std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok();
        match (bytes[i], hex().and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<S3Location, String> {
        let url = url::Url::parse(text).map_err(|e| e.to_string())?;
        S3Location::parse(text, &url).map_err(|e| e.to_string())
    }

    #[test]
    fn urls_carry_bucket_prefix_and_options() {
        let l = parse("s3://media/site/uploads/?endpoint=http://127.0.0.1:9000&region=garage&path_style=false").unwrap();
        assert_eq!(l.bucket, "media");
        assert_eq!(l.prefix, "site/uploads/");
        assert_eq!(l.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(l.region.as_deref(), Some("garage"));
        assert_eq!(l.path_style, Some(false));
        assert_eq!(parse("s3://media").unwrap().prefix, "");
        assert_eq!(
            parse("s3://media/with%20space").unwrap().prefix,
            "with space/"
        );
    }

    #[test]
    fn bad_urls_say_why() {
        for (bad, says) in [
            ("s3://Media/x", "not a valid bucket name"),
            ("s3://media/x?colour=red", "unknown option \"colour\""),
            ("s3://media/x?path_style=maybe", "expected true or false"),
            ("s3://media/x?endpoint=ftp://h", "expected http://"),
            ("s3://media:9000/x", "no port"),
            ("s3://key:secret@media/x", "no port or credentials"),
            ("s3://media/a//b", "empty or '.' segments"),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_flag_beats_the_url() {
        let l = parse("s3://media/p?endpoint=http://a:1&region=r1").unwrap();
        let flags = S3Flags {
            endpoint: Some("http://b:2".into()),
            ..Default::default()
        };
        let s = S3Settings::resolve(&l, &flags).unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("http://b:2"));
        assert_eq!(s.region.as_deref(), Some("r1"));
        assert!(s.path_style, "custom endpoints default to path style");
        assert_eq!(s.canonical_url(), "s3://media/p?endpoint=http://b:2");
        assert_eq!(s.cache_control.as_deref(), Some("max-age=86400"));
    }

    #[test]
    fn part_size_grows_to_fit_ten_thousand_parts() {
        let l = parse("s3://media/p?endpoint=http://a:1").unwrap();
        let s = S3Settings::resolve(&l, &S3Flags::default()).unwrap();
        assert_eq!(s.part_size_for(1 << 30), DEFAULT_PART_SIZE);
        assert!(s.part_size_for(1 << 40) * MAX_PARTS >= 1 << 40);
    }
}

//! What an S3 request's failure means for us: wait and retry (the dest is down or busy), or a
//! permanent problem the operator must fix — said in words that name it.

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// The kinds of failure the rest of cutoverfs acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteKind {
    /// No answer: connection refused or reset, DNS.
    Unreachable,
    Timeout,
    /// TLS handshake or certificate problem.
    Tls,
    /// SlowDown, 429, 503: the server asks us to back off.
    Throttled,
    /// Other 5xx.
    ServerError,
    AccessDenied,
    /// The credential chain found nothing to sign with.
    NoCredentials,
    NoSuchBucket,
    NotFound,
    ClockSkew,
    /// The server recomputed a checksum and it did not match what we sent.
    ChecksumMismatch,
    /// A conditional request's condition failed (If-None-Match / If-Match).
    PreconditionFailed,
    Other,
}

impl RemoteKind {
    /// Worth waiting for: the dest may come back or calm down.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            RemoteKind::Unreachable
                | RemoteKind::Timeout
                | RemoteKind::Throttled
                | RemoteKind::ServerError
        )
    }

    pub fn describe(self) -> &'static str {
        match self {
            RemoteKind::Unreachable => "endpoint unreachable",
            RemoteKind::Timeout => "timed out",
            RemoteKind::Tls => "TLS failure",
            RemoteKind::Throttled => "throttled by the server",
            RemoteKind::ServerError => "server error",
            RemoteKind::AccessDenied => "access denied",
            RemoteKind::NoCredentials => "no credentials",
            RemoteKind::NoSuchBucket => "no such bucket",
            RemoteKind::NotFound => "not found",
            RemoteKind::ClockSkew => "clock skew",
            RemoteKind::ChecksumMismatch => "checksum mismatch",
            RemoteKind::PreconditionFailed => "precondition failed",
            RemoteKind::Other => "request failed",
        }
    }
}

/// One failed request, classified, with the server's words (never credentials: the SDK's error
/// context holds none).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {detail}", kind.describe())]
pub struct RemoteError {
    pub kind: RemoteKind,
    pub status: Option<u16>,
    pub code: Option<String>,
    pub detail: String,
}

impl RemoteError {
    pub fn other(detail: impl Into<String>) -> RemoteError {
        RemoteError {
            kind: RemoteKind::Other,
            status: None,
            code: None,
            detail: detail.into(),
        }
    }

    pub fn classify<E>(err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> RemoteError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let detail = DisplayErrorContext(&err).to_string();
        let lower = detail.to_ascii_lowercase();
        let (kind, status, code) = match &err {
            SdkError::TimeoutError(_) => (RemoteKind::Timeout, None, None),
            SdkError::DispatchFailure(failure) => {
                let kind = if lower.contains("loading credentials")
                    || lower.contains("no credentials")
                    || lower.contains("credentials provider")
                {
                    RemoteKind::NoCredentials
                } else if failure.is_timeout() {
                    RemoteKind::Timeout
                } else if lower.contains("tls")
                    || lower.contains("certificate")
                    || lower.contains("handshake")
                {
                    RemoteKind::Tls
                } else {
                    RemoteKind::Unreachable
                };
                (kind, None, None)
            }
            SdkError::ResponseError(response) => {
                let status = response.raw().status().as_u16();
                (kind_of_status(status, None), Some(status), None)
            }
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let code = service.err().code().map(str::to_string);
                let message = service.err().message().unwrap_or_default();
                let kind = if is_about_the_clock(message) {
                    RemoteKind::ClockSkew
                } else {
                    kind_of_status(status, code.as_deref())
                };
                (kind, Some(status), code)
            }
            _ if lower.contains("credential") => (RemoteKind::NoCredentials, None, None),
            _ => (RemoteKind::Other, None, None),
        };
        RemoteError {
            kind,
            status,
            code,
            detail: short_detail(&detail),
        }
    }
}

/// Servers word a request dated too far from their clock differently (AWS: the code
/// RequestTimeTooSkewed; Garage: InvalidRequest "Date is too old").
fn is_about_the_clock(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("skew")
        || (message.contains("date") && (message.contains("too old") || message.contains("future")))
}

fn kind_of_status(status: u16, code: Option<&str>) -> RemoteKind {
    match (status, code) {
        (_, Some("RequestTimeTooSkewed")) => RemoteKind::ClockSkew,
        (_, Some("NoSuchBucket")) => RemoteKind::NoSuchBucket,
        (_, Some("SlowDown" | "Throttling" | "ThrottlingException" | "RequestLimitExceeded")) => {
            RemoteKind::Throttled
        }
        (
            _,
            Some("BadDigest" | "InvalidDigest" | "XAmzContentSHA256Mismatch" | "InvalidChecksum"),
        ) => RemoteKind::ChecksumMismatch,
        (412, _) | (_, Some("PreconditionFailed")) => RemoteKind::PreconditionFailed,
        (401 | 403, _) => RemoteKind::AccessDenied,
        (404, _) => RemoteKind::NotFound,
        (429 | 503, _) => RemoteKind::Throttled,
        (500..=599, _) => RemoteKind::ServerError,
        _ => RemoteKind::Other,
    }
}

/// The SDK's error context repeats itself at length; one line of it is enough for a log or a
/// manifest row.
fn short_detail(detail: &str) -> String {
    let line = detail.lines().next().unwrap_or(detail);
    if line.len() > 400 {
        let mut end = 400;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &line[..end])
    } else {
        line.to_string()
    }
}

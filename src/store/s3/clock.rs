//! This machine's clock against the server's: S3 refuses requests signed more than 15 minutes
//! off its clock, and some servers do not check at all — so the preflight compares the `Date`
//! header of the server's answer with our clock itself, and names the problem.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::BoxError;
use aws_sdk_s3::primitives::{DateTime, DateTimeFormat};

/// How far apart the clocks may be: what AWS S3 accepts.
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// Keeps the `Date` header of the last response it saw.
#[derive(Debug, Clone, Default)]
pub struct ServerDate(Arc<Mutex<Option<String>>>);

impl Intercept for ServerDate {
    fn name(&self) -> &'static str {
        "cutoverfs::ServerDate"
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _config: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(date) = context.response().headers().get("date") {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(date.to_string());
        }
        Ok(())
    }
}

impl ServerDate {
    /// How far our clock is off the server's, when the answer carried a date and they differ by
    /// more than S3 accepts: (server's date, our date, difference).
    pub fn skew(&self) -> Option<(String, String, Duration)> {
        let header = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let server = DateTime::from_str(&header, DateTimeFormat::HttpDate).ok()?;
        let server = SystemTime::try_from(server).ok()?;
        let ours = SystemTime::now();
        let difference = ours
            .duration_since(server)
            .or_else(|_| server.duration_since(ours))
            .ok()?;
        let ours = DateTime::from(ours)
            .fmt(DateTimeFormat::HttpDate)
            .unwrap_or_default();
        (difference > MAX_SKEW).then_some((header, ours, difference))
    }
}
